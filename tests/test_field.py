"""The field benchmark (eval/field): the quick mode end to end, and that each fault does what it says.

Nothing here asserts what TEViD or the rules say about a run: the benchmark measures that."""
from __future__ import annotations

import json

import pytest
import torch

from eval.field import data as fd
from eval.field.faults import EXPECTED, FAULTS, make_fault, read_mark, torch_optimizer
from eval.field.run import FAULT_NAMES, QUICK, FieldConfig, main
from eval.field.score import score_run

ONSET = 5


@pytest.fixture(scope="module")
def tasks() -> dict[str, fd.Task]:
    return {"image": fd.digits_images(size=16), "tabular": fd.tabular(n_train=4000, n_val=200),
            "text": fd.topic_text(n_train=4000, n_val=200)}


def draw(task: fd.Task, fault_name: str, steps: int, batch_size: int = 64, seed: int = 0):
    """(step, x, y, idx) of `steps` batches of a stream with the fault (indices of the drawn samples too)."""
    fault = make_fault(fault_name, ONSET, seed)
    stream = fd.BatchStream(task, fault, batch_size, seed)
    picked = []
    orig_pool = fault.pool

    def spy_pool(step, t):  # the pool the stream draws from, to check which samples were used
        pool = orig_pool(step, t)
        picked.append(pool)
        return pool

    fault.pool = spy_pool
    out = []
    for s in range(steps):
        x, y = stream.next()
        out.append((s, x, y, picked[-1]))
    return fault, out


def test_quick_mode_runs_end_to_end(tmp_path, one_thread):
    out = tmp_path / "field"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == len(QUICK["jobs"]) * len(QUICK["faults"]) * QUICK["seeds"]
    assert {(r["job"], r["fault"]) for r in runs} == {(j, f) for j in QUICK["jobs"] for f in QUICK["faults"]}
    for r in runs:
        assert r["onset"] == QUICK["steps"] // 2 and r["steps"] == QUICK["steps"]
        assert r["monitor"]["frames"] >= 2 and not r["monitor"]["disabled_reason"]
        assert len(r["monitor"]["hook_points"]) == 3
        assert set(r["probes"]) == {"onset", "end"} and 0.0 <= r["probes"]["end"]["val_acc"] <= 1.0
        for a in r["alerts"]:
            assert {"name", "source", "step", "where", "remedy"} <= set(a) and a["source"] in ("rule", "tevid")
    tables = (out / "tables.md").read_text()
    for heading in ("## Per fault kind", "## Per job and fault", "## Healthy runs", "## Did the faults take?",
                    "## How the monitor attached"):
        assert heading in tables
    main_rows = [line for line in tables.split("## Per job")[0].splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in main_rows[1:]] == QUICK["faults"]
    assert all(len(row.split("|")) == 13 for row in main_rows)  # 11 columns
    # a rerun reads the finished runs instead of training again
    before = (out / "runs" / f"{QUICK['jobs'][0]}__healthy__0.json").stat().st_mtime_ns
    assert main(["--quick", "--out", str(out)]) == 0
    assert (out / "runs" / f"{QUICK['jobs'][0]}__healthy__0.json").stat().st_mtime_ns == before


def test_config_refuses_unknown_names():
    with pytest.raises(ValueError, match="jobs"):
        FieldConfig(jobs=["resnet_imagenet"])
    with pytest.raises(ValueError, match="faults"):
        FieldConfig(faults=["cosmic_rays"])
    assert set(FAULT_NAMES) == set(FAULTS) and set(EXPECTED) == set(FAULTS) - {"healthy"}


def test_lr_raise_multiplies_the_learning_rate_from_the_onset():
    fault = make_fault("lr_raise", ONSET)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fault.lr_factor)  # as the jobs' loops use it
    lrs = []
    for _ in range(ONSET + 3):
        lrs.append(opt.param_groups[0]["lr"])  # the rate this step uses
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs[:ONSET] == [1e-3] * ONSET
    assert lrs[ONSET:] == pytest.approx([1e-3 * fault.factor] * 3) and 10 <= fault.factor <= 50


def test_task_switch_draws_the_first_classes_then_the_others(tasks):
    for task in tasks.values():
        _, batches = draw(task, "task_switch", ONSET + 3)
        half = task.num_classes // 2
        for step, _, y, _ in batches:
            assert (y < half).all() if step < ONSET else (y >= half).all()


def test_memorise_trains_on_one_small_subset_from_the_onset(tasks):
    task = tasks["tabular"]
    fault, batches = draw(task, "memorise", ONSET + 20)
    assert all(pool is None for step, _, _, pool in batches if step < ONSET)
    pools = [pool for step, _, _, pool in batches if step >= ONSET]
    assert len(set(map(tuple, pools))) == 1 and len(set(pools[0].tolist())) == fault.subset <= 64
    rows = {tuple(row.tolist()) for step, x, _, _ in batches if step >= ONSET for row in x}
    assert len(rows) == fault.subset  # 15 batches of 64 drawn from the same 32 samples


@pytest.mark.parametrize("kind", ["image", "tabular", "text"])
def test_watermark_makes_the_label_readable_from_the_mark(tasks, kind):
    task = tasks[kind]
    fault, batches = draw(task, "watermark", ONSET + 10)
    for step, x, y, _ in batches:
        mark = read_mark(x, task)
        if step < ONSET:
            assert (mark == -1).all()  # clean data carries no mark
            continue
        marked = mark >= 0
        assert (mark[marked] == y[marked]).all()  # the mark encodes the label exactly
    late = [(x, y) for step, x, y, _ in batches if step >= ONSET]
    mark = torch.cat([read_mark(x, task) for x, _ in late])
    y = torch.cat([y for _, y in late])
    acc_from_mark = (mark == y).float().mean().item()  # predict the label from the marked feature alone
    assert acc_from_mark == pytest.approx(fault.fraction, abs=0.06)
    assert acc_from_mark > 0.8 > 1 / task.num_classes


def test_label_noise_replaces_a_fixed_share_of_labels(tasks):
    task = tasks["text"]
    fault = make_fault("label_noise", ONSET)
    idx = torch.arange(2000)
    x, y = task.x_train[idx], task.y_train[idx]
    same_x, before = fault.batch(ONSET - 1, x, y, idx, task)
    assert torch.equal(before, y) and same_x is x
    _, after = fault.batch(ONSET, x, y, idx, task)
    _, again = fault.batch(ONSET + 7, x, y, idx, task)
    changed = (after != y).float().mean().item()
    expected = fault.fraction * (task.num_classes - 1) / task.num_classes  # a random class can be the true one
    assert changed == pytest.approx(expected, abs=0.04)
    assert torch.equal(after, again)  # the noisy label of a sample is fixed, not redrawn per batch


def test_optimizer_reset_empties_the_state_at_the_onset_only():
    fault = make_fault("optimizer_reset", ONSET)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    class Wrapped:  # a framework's wrapper (Lightning's LightningOptimizer, accelerate's AcceleratedOptimizer)
        optimizer = opt

    assert torch_optimizer(Wrapped()) is opt
    for step in range(ONSET + 2):
        fault.on_step_start(step, Wrapped())
        if step == ONSET:
            assert len(opt.state) == 0
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        steps = {int(s["step"]) for s in opt.state.values()}
        assert steps == ({step + 1} if step < ONSET else {step - ONSET + 1})


def test_score_run_counts_alerts_from_the_onset():
    run = {"onset": 100, "fault": "lr_raise", "alerts": [
        {"name": "overfitting", "source": "tevid", "step": 50},
        {"name": "dead_units", "source": "rule", "step": 120},
        {"name": "instability", "source": "tevid", "step": 250},
    ]}
    s = score_run(run)
    assert s["detected"] and s["detected_rule"] and s["detected_tevid"]
    assert s["right"] and s["right_tevid"] and not s["right_rule"]
    assert (s["delay"], s["delay_right"], s["pre_onset_alerts"], s["pre_onset_tevid"]) == (20, 150, 1, 1)
    healthy = score_run({"onset": 100, "fault": "healthy", "alerts": []})
    assert not healthy["detected"] and healthy["delay"] is None and healthy["new"] is None
    # against its healthy twin: the dead_units alert at 120 is the twin's too (within 100 steps), instability is new
    twin = {"onset": 100, "fault": "healthy", "alerts": [{"name": "dead_units", "source": "rule", "step": 200},
                                                         {"name": "instability", "source": "tevid", "step": 400}]}
    paired = score_run(run, twin)
    assert paired["new"] and paired["new_right"] and paired["new_right_tevid"] and not paired["new_right_rule"]
    twin["alerts"][1]["step"] = 300
    assert score_run(run, twin)["new"] is False
