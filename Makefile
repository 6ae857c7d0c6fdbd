# Task runner. `make demo` and `make test` do all set-up on a fresh clone (a .venv with the project).
PY ?= python3
VENV ?= .venv
export ONEDNN_MAX_CPU_ISA ?= AVX512_CORE_BF16
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test bench reproduce dynamics clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,bench]'
	touch $@

demo: setup
	$(VENV)/bin/python -m diagnose.demo --out outputs/demo

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python -m capture.bench --out outputs/bench

# The shipped default model from scratch (diagnose/default_checkpoint/; its MANIFEST.json lists these commands):
# the drawn cpu corpus (2,250 runs, 100 of them long and 80 long healthy ones at batch 16, ~76 min with 2 processes; a complete one is only checked, a few minutes), the dynamics model (configs/finetune/cpu_dynamics.yaml: run-relative
# scalars without the activation levels, the weights' pace and the run-so-far traces of both, train split, at most 100 windows a run) at seeds 0-8 (~7 min each, one thread, two at a time), three seed
# ensembles of three (0-2, 3-5, 6-8) calibrated on val, the test report of the three beside the baselines
# (docs/benchmark/README.md), the fingerprint probe, and ensemble 0 shipped. About 2 hours on a 2-core CPU.
LAUNCH2 = ACCELERATE_USE_CPU=true $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
	--mixed_precision no --dynamo_backend no
SHIP = outputs/finetune/ship
FT = $(VENV)/bin/python -m diagnose.finetune --config configs/finetune/cpu_dynamics.yaml --corpus outputs/corpus/cpu
reproduce: setup
	$(LAUNCH2) factory/generate.py --config configs/factory/cpu.yaml --out outputs/corpus/cpu  # resumes: runs only what is missing
	$(VENV)/bin/python -m factory.stats --corpus outputs/corpus/cpu
	for s in 0 2 4 6 8; do $(FT) --out $(SHIP)/s$$s seed=$$s threads=1 || exit 1; done & \
	for s in 1 3 5 7; do $(FT) --out $(SHIP)/s$$s seed=$$s threads=1 || exit 1; done; wait $$! || exit 1
	for e in 0 1 2; do $(VENV)/bin/python -m diagnose.recalibrate --corpus outputs/corpus/cpu --out $(SHIP)/ens$$e \
		--familiarity --familiarity-reads inputs --known-first --members $(SHIP)/s$$((3*e))/final $(SHIP)/s$$((3*e+1))/final $(SHIP)/s$$((3*e+2))/final || exit 1; done
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu --checkpoint $(SHIP)/ens0 --out outputs/report/ship \
		'methods=[tevid,cusum,bocpd,head_grad,gwa,tcn_scalar]' \
		'tevid_checkpoints={tevid_e1: $(SHIP)/ens1, tevid_e2: $(SHIP)/ens2}' 'seed_groups={tevid_3ensembles: [tevid, tevid_e1, tevid_e2]}'
	$(VENV)/bin/python -m eval.fingerprint --corpus outputs/corpus/cpu --checkpoint $(SHIP)/ens0 --out outputs/probes/ship
	$(VENV)/bin/python -m eval.ship --checkpoint $(SHIP)/ens0 --corpus outputs/corpus/cpu --report outputs/report/ship/metrics.json

# Issue 20's dynamics model on the drawn cpu corpus (docs/benchmark/inputs.md, "After"): the corpus (~55 min with
# 2 processes), 4 leave-one-family-out fold models and one on train + val (2-3 min each with loading), cross-fitted
# calibration, the fingerprint probe and the test report beside the baselines. Not shipped.
DYN = outputs/finetune/dyn
DYNC = --config configs/finetune/cpu_dynamics.yaml --corpus outputs/corpus/cpu
dynamics: setup
	$(LAUNCH2) factory/generate.py --config configs/factory/cpu.yaml --out outputs/corpus/cpu  # resumes: runs only what is missing
	for k in 0 1 2 3; do $(VENV)/bin/python -m diagnose.finetune $(DYNC) --out $(DYN)/fold$$k data.holdout_fold=$$k \
		'data.train_splits=[train,val]' || exit 1; done
	$(VENV)/bin/python -m diagnose.finetune $(DYNC) --out $(DYN)/all 'data.train_splits=[train,val]'
	$(VENV)/bin/python -m diagnose.crossfit --folds $(DYN)/fold0 $(DYN)/fold1 $(DYN)/fold2 $(DYN)/fold3 --checkpoint $(DYN)/all/final
	$(VENV)/bin/python -m eval.fingerprint --corpus outputs/corpus/cpu --checkpoint $(DYN)/all/final --out outputs/probes/dyn
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu --checkpoint $(DYN)/all/final --out outputs/report/dyn \
		'methods=[tevid,cusum,bocpd,head_grad,gwa,tcn_scalar]' 'tevid_checkpoints={tevid_shipped: diagnose/default_checkpoint}'

clean:
	rm -rf outputs .pytest_cache
