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
# the drawn cpu corpus (~47 min with 2 processes), the dynamics model (configs/finetune/cpu_dynamics.yaml: run-relative
# scalars and the weights' pace, train split, calibrated on val) at seeds 0, 1, 2 (~2 min each, one thread), the test
# report of the three beside the baselines (docs/benchmark/README.md), the fingerprint probe, and seed 0 shipped. About 1 hour on a 2-core CPU.
LAUNCH2 = ACCELERATE_USE_CPU=true $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
	--mixed_precision no --dynamo_backend no
SHIP = outputs/finetune/ship
reproduce: setup
	test -f outputs/corpus/cpu/manifest.jsonl || $(LAUNCH2) factory/generate.py --config configs/factory/cpu.yaml --out outputs/corpus/cpu
	$(VENV)/bin/python -m factory.stats --corpus outputs/corpus/cpu
	for s in 0 1 2; do $(VENV)/bin/python -m diagnose.finetune --config configs/finetune/cpu_dynamics.yaml \
		--corpus outputs/corpus/cpu --out $(SHIP)/s$$s seed=$$s threads=1 || exit 1; done
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu --checkpoint $(SHIP)/s0/final --out outputs/report/ship \
		'methods=[tevid,cusum,bocpd,head_grad,gwa,tcn_scalar]' \
		'tevid_checkpoints={tevid_s1: $(SHIP)/s1/final, tevid_s2: $(SHIP)/s2/final}' 'seed_groups={tevid_3seeds: [tevid, tevid_s1, tevid_s2]}'
	$(VENV)/bin/python -m eval.fingerprint --corpus outputs/corpus/cpu --checkpoint $(SHIP)/s0/final --out outputs/probes/ship
	$(VENV)/bin/python -m eval.ship --checkpoint $(SHIP)/s0/final --corpus outputs/corpus/cpu --report outputs/report/ship/metrics.json

# Issue 20's dynamics model on the drawn cpu corpus (docs/benchmark/inputs.md, "After"): the corpus (~55 min with
# 2 processes), 4 leave-one-family-out fold models and one on train + val (2-3 min each with loading), cross-fitted
# calibration, the fingerprint probe and the test report beside the baselines. Not shipped.
DYN = outputs/finetune/dyn
DYNC = --config configs/finetune/cpu_dynamics.yaml --corpus outputs/corpus/cpu
dynamics: setup
	test -f outputs/corpus/cpu/manifest.jsonl || $(LAUNCH2) factory/generate.py --config configs/factory/cpu.yaml --out outputs/corpus/cpu
	for k in 0 1 2 3; do $(VENV)/bin/python -m diagnose.finetune $(DYNC) --out $(DYN)/fold$$k data.holdout_fold=$$k \
		'data.train_splits=[train,val]' || exit 1; done
	$(VENV)/bin/python -m diagnose.finetune $(DYNC) --out $(DYN)/all 'data.train_splits=[train,val]'
	$(VENV)/bin/python -m diagnose.crossfit --folds $(DYN)/fold0 $(DYN)/fold1 $(DYN)/fold2 $(DYN)/fold3 --checkpoint $(DYN)/all/final
	$(VENV)/bin/python -m eval.fingerprint --corpus outputs/corpus/cpu --checkpoint $(DYN)/all/final --out outputs/probes/dyn
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu --checkpoint $(DYN)/all/final --out outputs/report/dyn \
		'methods=[tevid,cusum,bocpd,head_grad,gwa,tcn_scalar]' 'tevid_checkpoints={tevid_shipped: diagnose/default_checkpoint}'

clean:
	rm -rf outputs .pytest_cache
