# Task runner. `make demo` and `make test` do all set-up on a fresh clone (a .venv with the project).
PY ?= python3
VENV ?= .venv
export ONEDNN_MAX_CPU_ISA ?= AVX512_CORE_BF16
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test bench reproduce dynamics scaling clean
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
FTC = $(VENV)/bin/python -m diagnose.finetune --config configs/finetune/cpu_dynamics.yaml
FT = $(FTC) --corpus outputs/corpus/cpu
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

# What more of this corpus buys on the test split (docs/benchmark/inputs.md, "What more of this corpus buys"): the
# shipped config trained on train + val (seeds 0-2), on train without one fold of families (folds 0-3, seed 0), on a
# seeded half and quarter of the train runs with as many optimizer steps (32 and 64 epochs; seeds 0-2 and 0-1), and
# on half without the extra steps (seed 0); wider heads, a wider GRU and twice the epochs (seed 0); and two oracles
# that no shipped model may be (seeds 0-1 each): train plus the test split's runs of one dataset (pysrc_chars, then
# mnist1d_aligned_seq: its LSTM and RNN runs under Lion and Adafactor), scored on its other datasets (the report's
# Table 4 rows; ORACLE_CORPUS writes each as a linked copy of the corpus). One test report beside the nine seeds
# `make reproduce` trains (it must have run). Event AUPRC is the figure: the train + val models are calibrated on val,
# which they trained on, and the fold models on their fold. 20 fine-tunes of 3-16 min and a report of ~40 min.
SCALE = outputs/finetune/scale
SCALED = tv_s0 tv_s1 tv_s2 f0_s0 f1_s0 f2_s0 f3_s0 lf50e32_s0 lf50e32_s1 lf50e32_s2 lf25e64_s0 lf25e64_s1 lf50_s0 \
	h512_s0 r128_s0 e32_s0 oracle_pysrc_chars_s0 oracle_pysrc_chars_s1 \
	oracle_mnist1d_aligned_seq_s0 oracle_mnist1d_aligned_seq_s1
define ORACLE_CORPUS
import json, os, pathlib
name = os.environ["ORACLE_DATASET"]
src, dst = pathlib.Path("outputs/corpus/cpu").resolve(), pathlib.Path("outputs/corpus/oracle_" + name)
(dst / "runs").mkdir(parents=True, exist_ok=True)
for p in (src / "runs").iterdir():
    (dst / "runs" / p.name).is_symlink() or (dst / "runs" / p.name).symlink_to(p)
(dst / "config.json").write_text((src / "config.json").read_text())
rows = [json.loads(line) for line in (src / "manifest.jsonl").read_text().splitlines() if line.strip()]
for r in rows:
    r["split"] = "train" if (r["split"], r["dataset"]) == ("test", name) else r["split"]
(dst / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
endef
export ORACLE_CORPUS
scaling: setup
	for s in 0 1 2; do $(FT) --out $(SCALE)/tv_s$$s 'data.train_splits=[train, val]' seed=$$s threads=1 || exit 1; done
	for k in 0 1 2 3; do $(FT) --out $(SCALE)/f$${k}_s0 data.holdout_fold=$$k seed=0 threads=1 || exit 1; done
	for s in 0 1 2; do $(FT) --out $(SCALE)/lf50e32_s$$s data.label_fraction=0.5 epochs=32 seed=$$s threads=1 || exit 1; done
	for s in 0 1; do $(FT) --out $(SCALE)/lf25e64_s$$s data.label_fraction=0.25 epochs=64 seed=$$s threads=1 || exit 1; done
	$(FT) --out $(SCALE)/lf50_s0 data.label_fraction=0.5 seed=0 threads=1
	$(FT) --out $(SCALE)/h512_s0 model.hidden_dim=512 seed=0 threads=1
	$(FT) --out $(SCALE)/r128_s0 model.readout_dim=128 model.hidden_dim=512 seed=0 threads=1
	$(FT) --out $(SCALE)/e32_s0 epochs=32 seed=0 threads=1
	for d in pysrc_chars mnist1d_aligned_seq; do ORACLE_DATASET=$$d $(VENV)/bin/python -c "$$ORACLE_CORPUS" || exit 1; \
		for s in 0 1; do $(FTC) --corpus outputs/corpus/oracle_$$d --out $(SCALE)/oracle_$${d}_s$$s seed=$$s threads=1 || exit 1; done; done
	ck=$$(for s in 1 2 3 4 5 6 7 8; do printf 's%s: $(SHIP)/s%s/final, ' $$s $$s; done; \
		for m in $(SCALED); do printf '%s: $(SCALE)/%s/final, ' $$m $$m; done); \
	$(VENV)/bin/python -m eval.report --corpus outputs/corpus/cpu --checkpoint $(SHIP)/s0/final --out outputs/report/scaling \
		'methods=[tevid]' figures=false "tevid_checkpoints={$${ck%, }}"

clean:
	rm -rf outputs .pytest_cache
