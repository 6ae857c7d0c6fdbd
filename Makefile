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

# The shipped default model from scratch (diagnose/default_checkpoint/; its MANIFEST.json lists these
# commands). About 2-3 hours on a quiet 2-core CPU; the corpus and checkpoints go to outputs/.
LAUNCH2 = ACCELERATE_USE_CPU=true $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
	--mixed_precision no --dynamo_backend no
reproduce: setup
	$(LAUNCH2) factory/generate.py --config configs/factory/cpu_grid.yaml --out outputs/corpus/cpu_grid
	$(VENV)/bin/python -m factory.relabel --corpus outputs/corpus/cpu_grid --calibrate --config configs/factory/cpu_grid.yaml
	$(VENV)/bin/python -m factory.stats --corpus outputs/corpus/cpu_grid
	$(VENV)/bin/python -m pretrain.clips export --corpus outputs/corpus/cpu_grid --out outputs/shards/cpu --overwrite
	$(LAUNCH2) pretrain/train.py --config configs/pretrain/cpu.yaml --corpus outputs/shards/cpu --out outputs/pretrain/cpu
	$(LAUNCH2) diagnose/finetune.py --config configs/finetune/cpu.yaml --corpus outputs/corpus/cpu_grid \
		--checkpoint outputs/pretrain/cpu/final --out outputs/finetune/cpu
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu_grid --checkpoint outputs/finetune/cpu/final --out outputs/report/cpu
	$(VENV)/bin/python -m eval.ship --checkpoint outputs/finetune/cpu/final --corpus outputs/corpus/cpu_grid \
		--report outputs/report/cpu/metrics.json

# Issue 20's dynamics model on the drawn cpu corpus (docs/benchmark/inputs.md, "After"): the corpus (~55 min with
# 2 processes), 4 leave-one-family-out fold models and one on train + val (2-3 min each with loading), cross-fitted
# calibration, the fingerprint probe and the test report beside the baselines. Not shipped.
DYN = outputs/finetune/dyn
DYNC = --config configs/finetune/cpu_dynamics.yaml --corpus outputs/corpus/cpu
dynamics: setup
	test -f outputs/corpus/cpu/manifest.jsonl || $(LAUNCH2) factory/generate.py --config configs/factory/cpu.yaml --out outputs/corpus/cpu
	for k in 0 1 2 3; do $(VENV)/bin/python -m diagnose.finetune $(DYNC) --out $(DYN)/fold$$k data.holdout_fold=$$k || exit 1; done
	$(VENV)/bin/python -m diagnose.finetune $(DYNC) --out $(DYN)/all
	$(VENV)/bin/python -m diagnose.crossfit --folds $(DYN)/fold0 $(DYN)/fold1 $(DYN)/fold2 $(DYN)/fold3 --checkpoint $(DYN)/all/final
	$(VENV)/bin/python -m eval.fingerprint --corpus outputs/corpus/cpu --checkpoint $(DYN)/all/final --out outputs/probes/dyn
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu --checkpoint $(DYN)/all/final --out outputs/report/dyn \
		'methods=[tevid,cusum,bocpd,head_grad,gwa,tcn_scalar]' 'tevid_checkpoints={tevid_shipped: diagnose/default_checkpoint}'

clean:
	rm -rf outputs .pytest_cache
