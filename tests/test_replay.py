"""The streaming replay (eval/replay.py): the past only, public data only, shapes, confirmed alerts."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capture.store import read_privileged
from diagnose.decision import Rule
from eval.baselines import BocpdDetector, CusumDetector, TCNConfig, make_baseline, train_tcn
from eval.metrics import RunResult
from eval.replay import (RUN_INFO_KEYS, FrameOutput, PastView, confirmed_alerts, load_runs, replay, replay_runs,
                         run_outputs, unknown_mask, with_alerts)
from pretrain.clips import CLASSES

from conftest import copy_without_privileged

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Peeker:
    """Tries every way to reach the future it can think of, and records what it saw."""

    name, kind = "peeker", "video"

    def __init__(self):
        self.infos, self.kept, self.seen = [], [], []

    def reset(self, run_info):
        self.infos.append(dict(run_info))

    def step(self, view: PastView) -> FrameOutput:
        self.kept.append(view)  # keep references: later frames must not show up in them
        t, f = view.t, view.frames
        storage_frames = f.untyped_storage().nbytes() // (f[0].numel() * f.element_size())
        whole = torch.empty(0, dtype=f.dtype).set_(f.untyped_storage())  # everything the storage holds
        arrays = (view.frame_step, view.readouts, view.train_loss, view.lr)
        self.seen.append(dict(t=t, frames=len(f), storage_frames=storage_frames, bases=[a.base is not None for a in arrays],
                              steps=len(view.train_loss), last_step=view.step, readout_rows=len(view.readouts)))
        # a score that depends on everything reachable: equal outputs of full and truncated runs prove nothing more is
        reach = float(whole.double().sum()) + float(np.nansum(view.train_loss)) + float(np.nansum(view.readouts))
        return FrameOutput(score=reach + 1e-3 * storage_frames)


def test_views_hold_only_the_past(smoke_corpus):
    runs = load_runs(smoke_corpus, "train", progress=False)
    peek = Peeker()
    replay_runs(runs, peek, score_from=0, progress=False)
    assert [len(r) for r in runs] == [12, 12]
    for seen in peek.seen:
        t = seen["t"]
        assert seen["frames"] == seen["storage_frames"] == t + 1  # the storage behind the frames ends at t
        assert seen["bases"] == [False] * 4  # own memory: no .base leading to the whole array
        assert seen["readout_rows"] == t + 1 and seen["steps"] == seen["last_step"] + 1
    # references kept from earlier frames did not grow afterwards
    for view in peek.kept:
        assert len(view.frames) == view.t + 1 and len(view.frame_step) == view.t + 1
        assert not view.train_loss.flags.writeable
    # reset() gets public facts only
    for info in peek.infos:
        assert set(info) == set(RUN_INFO_KEYS)
        assert not {"label", "onset_step", "trigger_step", "perturbation", "split"} & set(info)
    assert peek.infos[0]["epoch_steps"] == 6 and peek.infos[0]["arch"] == "resnet"


def test_truncated_run_gives_the_same_outputs(smoke_corpus):
    """Outputs up to frame t of the full run equal those of the run cut at frame t, for a diagnoser that
    reaches for everything it can, and for the streaming baselines."""
    runs = load_runs(smoke_corpus, None, progress=False)
    tcn, _ = train_tcn(runs, TCNConfig(epochs=2), progress=False)
    diagnosers = [Peeker(), CusumDetector(), BocpdDetector(), make_baseline("head_grad"), make_baseline("gwa"), tcn]
    for run in runs[:3]:
        for d in diagnosers:
            full = run_outputs(run, d)
            for t in (0, 4, 9):
                cut = run_outputs(run.truncated(t + 1), d)
                assert len(cut) == t + 1
                for a, b in zip(cut, full):
                    assert a.score == b.score
                    assert (a.probs is None) == (b.probs is None)
                    if a.probs is not None:
                        np.testing.assert_array_equal(a.probs, b.probs)


def test_replay_shapes_and_no_privileged_read(smoke_corpus, tmp_path, privileged_watch):
    """Replay a copied corpus whose privileged groups are destroyed: same results, nothing under
    privileged/ opened or listed (audit hook), and reading privileged data there does fail."""
    copy = copy_without_privileged(smoke_corpus, tmp_path / "smoke", lock=True)
    with privileged_watch:
        results = {name: replay(copy, None, make_baseline(name), progress=False) for name in ("cusum", "head_grad")}
        framed = replay(copy, "test", Peeker(), progress=False)
    assert privileged_watch.touched == []
    with pytest.raises(Exception):
        read_privileged(next(copy.glob("runs/*.zarr")))
    manifest = [json.loads(x) for x in (copy / "manifest.jsonl").read_text().splitlines()]
    for res in results.values():
        assert [r.run_id for r in res] == [m["run_id"] for m in manifest]
        for r, m in zip(res, manifest):
            assert isinstance(r, RunResult)
            assert r.frame_step.tolist() == [45, 50, 55]  # frames 9..11 of 12 (score_from = 9)
            assert r.score.shape == (3,) and r.probs is None and r.vacuity is None and r.alerts == []
            assert (r.label, r.trigger_step) == (m["label"], m["trigger_step"])
            assert r.novel == (m["injected"] == "novel")
            if not r.novel:  # a novel run's onset is its perturbation's (the labeler leaves it null)
                assert r.onset_step == m["onset_step"]
    assert len(framed) == 4
    intact = replay(smoke_corpus, None, make_baseline("cusum"), progress=False)
    assert [r.score.tolist() for r in intact] == [r.score.tolist() for r in results["cusum"]]


def _constant(name, output):
    """A scalar diagnoser named `name` that gives `output` at every frame."""
    class Constant:
        kind, frame_window = "scalar", 0

        def reset(self, info):
            pass

        def step(self, view):
            return output

    diagnoser = Constant()
    diagnoser.name = name
    return diagnoser


def test_diagnoser_errors_are_named(smoke_corpus):
    runs = load_runs(smoke_corpus, "val", frames=False, progress=False)
    with pytest.raises(TypeError, match="bad.*FrameOutput"):
        replay_runs(runs, _constant("bad", 0.5), progress=False)
    with pytest.raises(ValueError, match="loaded without frames"):
        replay_runs(runs, Peeker(), progress=False)


def test_a_run_shorter_than_a_window_has_empty_outputs_of_the_methods_kind(smoke_corpus):
    """No scored frame: a class-probability method's run still has probs (0, K) and vacuity (0,), so the
    summary treats it as every other run of the method (a diverged val run once stopped the report)."""
    runs = load_runs(smoke_corpus, "val", frames=False, progress=False)
    probs = _constant("probs", FrameOutput(score=0.5, probs=np.full(len(CLASSES), 1 / len(CLASSES)), vacuity=0.2))
    longest = max(len(r.frame_step) for r in runs)
    short = replay_runs(runs, probs, score_from=longest, progress=False)  # every run shorter than the window
    assert all(r.probs.shape == (0, len(CLASSES)) and r.vacuity.shape == (0,) for r in short)
    full = replay_runs(runs, probs, progress=False)
    from eval.metrics import summarize
    both, alone = summarize(full + short, n_resamples=20, progress=False), summarize(full, n_resamples=20, progress=False)
    assert both["event_auprc"] == alone["event_auprc"] and both["macro_f1"] is not None


def _result(score, probs=None, vacuity=None):
    t = len(score)
    return RunResult("r", "instability", False, 0, 40, 10, np.arange(t) * 10, score, probs, vacuity)


def test_confirmed_alerts_score_only():
    r = _result([0.1, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.9, 0.1])
    assert confirmed_alerts(r, threshold=0.5) == [(60, "anomaly")]
    assert confirmed_alerts(r, threshold=0.5, consecutive=2) == [(20, "anomaly"), (50, "anomaly")]
    assert confirmed_alerts(r, threshold=0.95) == []
    with pytest.raises(ValueError, match="exactly one"):
        confirmed_alerts(r)


def test_confirmed_alerts_with_the_decision_rule():
    inst = np.array([0.05, 0.05, 0.8, 0.05, 0.05])  # instability
    healthy = np.array([0.8, 0.05, 0.05, 0.05, 0.05])
    probs = np.stack([healthy, inst, inst, inst, inst, inst, inst])
    vac = np.array([0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1])  # frame 3 is Unknown: it breaks the streak
    r = _result(1 - probs[:, 0], probs, vac)
    rule = Rule((0.6,) * 4, tau=0.35)
    assert confirmed_alerts(r, rule=rule) == [(60, "instability")]
    assert unknown_mask(r, rule).tolist() == [False, False, False, True, False, False, False]
    no_vac = _result(1 - probs[:, 0], probs)  # without vacuity: never Unknown
    assert confirmed_alerts(no_vac, rule=rule) == [(30, "instability")]
    # score threshold on a class-probability method: alert class = most probable anomaly class
    assert confirmed_alerts(no_vac, threshold=0.5) == [(30, "instability")]
    out = with_alerts([r, no_vac], rule=rule)
    assert [x.alerts for x in out] == [[(60, "instability")], [(30, "instability")]] and r.alerts == []
    with pytest.raises(ValueError, match="class probabilities"):
        confirmed_alerts(_result([0.1, 0.2]), rule=rule)
    assert confirmed_alerts(_result(np.zeros(0)), rule=rule) == []  # shorter than a window: no frame, no alert
    assert CLASSES[2] == "instability"


def test_replay_module_reads_stores_only_through_runstore():
    tree = ast.parse((ROOT / "eval" / "replay.py").read_text())
    names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
    names += [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert "read_privileged" not in names and "zarr" not in names and "RunStore" in names


@pytest.mark.parametrize("representation", ["frames", "relative"])
def test_tevid_diagnoser_matches_the_clip_windows(smoke_corpus, representation):
    """TEViD in the replay sees the same windows as calibration/fine-tuning (pretrain.clips.CorpusClips),
    on the stored frames and on the run-relative inputs alike."""
    from diagnose.calibrate import Calibration, predict_records
    from diagnose.evidential import dirichlet
    from diagnose.tevid import TEViD, TEViDConfig
    from eval.replay import TEViDDiagnoser
    from pretrain.clips import ClipConfig, CorpusClips

    overrides = {"img_size": 8, "patch_size": 2} if representation == "relative" else {}
    model = TEViD(TEViDConfig(encoder="tiny", encoder_overrides=overrides, representation=representation,
                              step_losses=representation == "relative",  # the losses between frames and the
                              weight_step=representation == "relative")).eval()  # weights' pace too
    with torch.no_grad():  # large head weights: outputs that differ from window to window
        for p in model.head.parameters():
            p.normal_(0, 3.0)
    cal = Calibration.default(5, CLASSES)
    diag = TEViDDiagnoser(model, cal)
    runs = load_runs(smoke_corpus, "test", progress=False)
    results = replay_runs(runs, diag, progress=False)
    records = predict_records(model, CorpusClips(smoke_corpus, "test", ClipConfig(representation=representation)))
    for r in results:
        rows = sorted((x for x in records if x["run_id"] == r.run_id), key=lambda x: x["end_frame"])
        assert [x["end_frame"] for x in rows] == [9, 10, 11] and r.probs.shape == (3, 5)
        d = dirichlet(torch.tensor([x["logits"] for x in rows]))
        np.testing.assert_allclose(r.probs, d.probs.double().numpy(), atol=1e-5)
        np.testing.assert_allclose(r.vacuity, d.vacuity.double().numpy(), atol=1e-5)
    assert np.concatenate([r.probs for r in results]).std(axis=0).max() > 0.01  # the comparison has teeth
    for r in with_alerts(results, rule=cal.rule()):  # alerts only at the 3rd frame (frames 9..11 scored)
        assert all(step == 55 and c in CLASSES[1:] for step, c in r.alerts)
    full, cut = run_outputs(runs[0], diag), run_outputs(runs[0].truncated(10), diag)
    assert [o.score for o in cut] == [o.score for o in full[:10]]
