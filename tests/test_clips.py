"""The clip data path (pretrain/clips.py, docs/clips.md): windows, targets, shards, loader, privileged rule."""
import ast
import json
from pathlib import Path

import pytest
import torch

from capture.store import RunStore
from diagnose.tevid import readout_features
from pretrain.clips import (CLASSES, CLIP_READOUTS, IGNORE, ClipConfig, CorpusClips, clip_loader, collate, export_shards,
                            main, run_targets, window_anomalous, window_targets)

from conftest import copy_without_privileged

ROOT = Path(__file__).resolve().parents[1]


def _key(item) -> tuple:
    return item["run_id"], item["end_frame"]


def _unbatch(batches) -> list[dict]:
    """Collated batches back to items (scalars as python values)."""
    def one(v, i):
        return v[i].item() if torch.is_tensor(v) and v.ndim == 1 else v[i]
    return [{k: one(v, i) for k, v in b.items()} for b in batches for i in range(len(b["run_id"]))]


def _same_item(a: dict, b: dict) -> bool:
    return (torch.equal(a["frames"].view(torch.int16), b["frames"].view(torch.int16))
            and torch.equal(a["readouts"].nan_to_num(-7.0), b["readouts"].nan_to_num(-7.0))
            and all(int(a[k]) == int(b[k]) for k in ("target", "novel", "end_frame", "end_step"))
            and all(a[k] == b[k] for k in ("run_id", "split", "label")))


@pytest.fixture(scope="module")
def shards(smoke_corpus, tmp_path_factory) -> Path:
    """The smoke corpus exported through the CLI, 3 clips per shard (test split: 12 clips, 4 shards)."""
    out = tmp_path_factory.mktemp("clips")
    assert main(["export", "--corpus", str(smoke_corpus), "--out", str(out), "--shard-size", "3"]) == 0
    return out


def test_windows_are_causal_and_match_the_store(smoke_corpus):
    ds = CorpusClips(smoke_corpus, None)
    assert len(ds.runs) == 7 and len(ds) == sum(r["n_frames"] - 9 for r in ds.runs)  # no padded windows
    for k in range(0, len(ds), 4):
        item = ds[k]
        t, record = item["end_frame"], next(r for r in ds.runs if r["run_id"] == item["run_id"])
        store = RunStore(smoke_corpus / record["store"])
        assert t >= 9 and item["frames"].dtype == torch.bfloat16 and item["frames"].shape == (10, 6, 16, 16)
        assert torch.equal(item["frames"].view(torch.int16), store.frames()[t - 9:t + 1].view(torch.int16))
        cols = [store.readout_names.index(n) for n in CLIP_READOUTS]
        assert torch.equal(item["readouts"], store.readouts()[t - 9:t + 1, cols])
        assert item["end_step"] == store.frame_step()[t].item() and item["split"] == record["split"]
    uncached = CorpusClips(smoke_corpus, None, cache_bytes=0)  # one zarr read per window
    assert all(_same_item(uncached[k], ds[k]) for k in range(len(ds)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["frames"].shape == (4, 10, 6, 16, 16) and batch["readouts"].shape == (4, 10, 8)
    assert batch["target"].dtype == torch.long and batch["novel"].dtype == torch.bool and len(batch["run_id"]) == 4
    stride = CorpusClips(smoke_corpus, "train", ClipConfig(window=4, stride=3))
    assert [ds_i[1] for ds_i in stride.index[:3]] == [3, 6, 9]


def test_spaced_windows_are_the_run_at_a_coarser_cadence(smoke_corpus):
    """spacings=(1, 2): the spacing-2 windows are what a stream pushed every second stored frame sees
    (its own reference and frame-to-frame changes, the losses of every step since the frame it saw last),
    with the real steps and the targets of those steps."""
    from capture.relative import WEIGHT_FEATURES, RELATIVE_FEATURES, relative_frames, share_columns, spaced_shares, step_loss_features

    one = CorpusClips(smoke_corpus, "train", ClipConfig(window=4, representation="relative"))
    both = CorpusClips(smoke_corpus, "train", ClipConfig(window=4, representation="relative", spacings=(1, 2)))
    spaced = [both[k] for k, (i, _) in enumerate(both.index) if both._runs[i].spacing == 2]
    record = one.runs[0]
    n = record["n_frames"]
    assert len(both) == len(one) + sum((r["n_frames"] + 1) // 2 - 3 for r in one.runs)
    store = RunStore(smoke_corpus / record["store"])
    cols = [store.readout_names.index(c) for c in CLIP_READOUTS]
    steps, loss = store.frame_step()[::2].tolist(), store.train_loss()
    between = [loss[0:steps[0] + 1]] + [loss[a + 1:b + 1] for a, b in zip(steps, steps[1:])]
    assert all(len(b) == 2 * store.attrs["capture"]["config"]["cadence"] for b in between[1:])  # two stored frames' steps
    rates = store.readouts()[:, store.readout_names.index("weight_step")].double()  # per step, over one stored gap
    spaced_rates = torch.stack([rates[0]] + [rates[a + 1:a + 3].mean() for a in range(0, len(rates) - 2, 2)])
    pats, scal = relative_frames(store.levels()[::2], store.patterns()[::2], store.readouts()[::2, cols],
                                 int(store.attrs["num_classes"]), step_losses=between, weight_steps=spaced_rates,
                                 shares=spaced_shares(share_columns(store.readouts(), store.readout_names), range(0, n, 2)))
    w = [RELATIVE_FEATURES.index(n) for n in WEIGHT_FEATURES]
    assert torch.isfinite(rates[1:]).all() and scal[2:, w].abs().sum() > 0  # the weights' pace, over both gaps
    sl = [RELATIVE_FEATURES.index(n) for n in ("step_loss_spike", "step_loss_noise")]
    assert scal[1:, sl].abs().sum() > 0 and torch.allclose(
        scal[1, sl], torch.asinh(torch.tensor(step_loss_features(between[1]), dtype=torch.float32)))
    first = [x for x in spaced if x["run_id"] == record["run_id"]]
    assert len(first) == (n + 1) // 2 - 3
    for x in first:
        t = x["end_frame"]
        assert torch.allclose(x["readouts"], scal[t - 3:t + 1]) and torch.allclose(x["frames"], pats[t - 3:t + 1])
        assert x["end_step"] == store.frame_step()[2 * t].item()
    last = first[-1]
    same_step = next(one[k] for k, (i, t) in enumerate(one.index)
                     if one._runs[i].record["run_id"] == record["run_id"] and t == 2 * last["end_frame"])
    assert same_step["end_step"] == last["end_step"]
    assert not torch.allclose(same_step["readouts"], last["readouts"])  # frame-to-frame changes at the coarser cadence
    with pytest.raises(ValueError, match="spacings.*relative"):
        ClipConfig(spacings=(1, 2))
    with pytest.raises(ValueError, match="distinct integers >= 1"):
        ClipConfig(representation="relative", spacings=(0,))


STEPS = list(range(0, 60, 5))  # 12 frames, every 5 steps; epoch = 6 steps, H = 2 epochs = 12 steps
I = IGNORE


@pytest.mark.parametrize("label, onset, trigger, novel, expected", [
    ("healthy", None, None, False, [0] * 12),
    ("instability", 18, 34, False, [0, 0, 0, 0, I, 2, 2, 2, 2, 2, 2, 2]),  # positives from max(18, 34 - 12) = 22
    ("forgetting", 10, 20, False, [0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]),  # g - H = 8 < onset: from the onset
    ("concept_bias", 0, 50, False, [I] * 8 + [4] * 4),  # from-start perturbation: no healthy windows
    ("overfitting", 0, None, False, [1] * 12),  # no trigger: positive from the onset
    ("underperforming", None, None, False, [I] * 12),
    (None, None, None, False, [I] * 12),  # unlabeled run
    ("healthy", 18, None, True, [0, 0, 0, 0] + [I] * 8),  # novel: IGNORE from the onset, novel mask
    ("instability", 30, 40, True, [0] * 6 + [I] * 6),  # novel wins over the rule's label
])
def test_window_targets(label, onset, trigger, novel, expected):
    target, mask = window_targets(STEPS, label, onset, trigger, 6, novel, ClipConfig(horizon_epochs=2.0))
    assert target.tolist() == expected and target.dtype == torch.long
    assert mask.tolist() == ([novel and s >= onset for s in STEPS])


@pytest.mark.parametrize("label, onset, novel, expected", [
    ("healthy", None, False, [0] * 12),
    ("instability", 18, False, [0, 0, 0, 0] + [1] * 8),  # from the onset: the class target's ignored stretch included
    ("concept_bias", 0, False, [1] * 12),
    ("underperforming", None, False, [I] * 12),
    (None, None, False, [I] * 12),
    ("instability", 30, True, [0] * 6 + [I] * 6),  # novel: not trained on from the onset
])
def test_window_anomalous(label, onset, novel, expected):
    assert window_anomalous(STEPS, label, onset, novel).tolist() == expected
    with pytest.raises(ValueError, match="unknown label 'weird'"):
        window_anomalous(STEPS, "weird", 0, False)


def test_window_targets_errors():
    with pytest.raises(ValueError, match="unknown label 'weird'"):
        window_targets(STEPS, "weird", 0, None, 6, False)
    with pytest.raises(ValueError, match="epoch_steps"):
        window_targets(STEPS, "overfitting", 0, 30, None, False)


def test_run_targets_take_a_novel_onset_from_the_perturbation(smoke_corpus):
    ds = CorpusClips(smoke_corpus, "test")
    novel = [r for r in ds._runs if r.record["perturbation"] == "label_noise"]
    assert novel and all(r.novel.tolist() == [s >= 18 for s in r.steps] for r in novel)
    attrs = {"label": "healthy", "onset_step": None, "trigger_step": None, "epoch_steps": 6,
             "perturbation": {"kind": "novel", "onset": 30}}
    assert run_targets(attrs, STEPS)[0].tolist() == [0] * 6 + [I] * 6


def test_class_from_onset_names_an_injected_anomaly_from_its_onset():
    """With class_from_onset, a run labelled the class its perturbation injected is that class from the onset
    (the stretch before trigger - H too); one whose label differs from the injection keeps trigger - H."""
    cfg = ClipConfig(horizon_epochs=2.0, class_from_onset=True)
    attrs = {"label": "instability", "onset_step": 18, "trigger_step": 34, "epoch_steps": 6,
             "perturbation": {"kind": "known", "injected": "instability"}}
    assert run_targets(attrs, STEPS, cfg)[0].tolist() == [0, 0, 0, 0] + [2] * 8
    assert run_targets(attrs, STEPS)[0].tolist() == [0, 0, 0, 0, I, 2, 2, 2, 2, 2, 2, 2]  # default: trigger - H
    other = {**attrs, "perturbation": {"kind": "healthy", "injected": "healthy"}}
    assert run_targets(other, STEPS, cfg)[0].tolist() == [0, 0, 0, 0, I, 2, 2, 2, 2, 2, 2, 2]


def test_readout_features():
    raw = torch.tensor([0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e12, 2.0])
    out = readout_features(raw.expand(2, 3, 8))
    assert out.shape == (2, 3, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    l2, l3 = torch.log(torch.tensor(2.0)), torch.log(torch.tensor(3.0))
    expected = torch.tensor([0, l2, -l2, 0, 0, 0, torch.log1p(torch.tensor(1e12)), l3])
    assert torch.allclose(out[1, 2, :8], expected)
    assert out[0, 0, 8:].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]


def test_export_and_loader_round_trip(smoke_corpus, shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["clip_config"] == {"window": 10, "stride": 1, "horizon_epochs": 2.0, "representation": "frames", "spacings": [1],
                                   "reference_lag": 0, "history_rate": 0.03, "peak_decay": 0.05, "best_decay": 0.0,
                                   "best_from_steps": False,
                                   "class_from_onset": False}
    assert index["shards"]["test"] == [f"clips-{i:06d}.tar" for i in range(4)]
    for split in ("train", "val", "test"):
        expected = {_key(x): x for x in CorpusClips(smoke_corpus, split)}
        got = _unbatch(clip_loader(shards / split, batch_size=2, shuffle=0))
        assert len(got) == len(expected) == index["counts"][split]["total"]
        assert all(_same_item(x, expected[_key(x)]) for x in got)
        targets = [x["target"] for x in expected.values()]
        assert index["counts"][split]["ignore"] == targets.count(IGNORE)
        assert all(index["counts"][split][c] == targets.count(k) for k, c in enumerate(CLASSES))
    # the two novel test runs (label_noise, onset 18 = frame 3) contribute their 3 windows each
    assert index["counts"]["test"]["novel"] == 6
    with pytest.raises(FileExistsError, match="overwrite"):
        export_shards(smoke_corpus, shards)


def test_shuffling_shuffles_and_is_seeded(shards):
    order = lambda loader: [_key(x) for x in _unbatch(loader)]  # noqa: E731
    plain = order(clip_loader(shards / "test", batch_size=3, shuffle=0))
    loader = clip_loader(shards / "test", batch_size=3, shuffle=100, seed=1)
    epoch0, epoch1 = order(loader), order(loader)
    assert sorted(epoch0) == sorted(epoch1) == sorted(plain)
    assert epoch0 != plain and epoch1 != epoch0  # a new order every epoch
    assert order(clip_loader(shards / "test", batch_size=3, shuffle=100, seed=1)) == epoch0  # reproducible


def test_shards_split_disjointly_over_ranks_and_workers(shards, monkeypatch):
    everything = sorted(_key(x) for x in _unbatch(clip_loader(shards / "test", batch_size=4)))
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("WORLD_SIZE", "2")
        for worker in range(2):
            monkeypatch.setenv("WORKER", str(worker)), monkeypatch.setenv("NUM_WORKERS", "2")
            part = [_key(x) for x in _unbatch(clip_loader(shards / "test", batch_size=4))]
            assert len(part) == 3  # 4 shards of 3 clips: one shard per (rank, worker)
            seen += part
        monkeypatch.delenv("WORKER"), monkeypatch.delenv("NUM_WORKERS")
        real_workers = [_key(x) for x in _unbatch(clip_loader(shards / "test", batch_size=4, num_workers=2))]
        assert sorted(real_workers) == sorted(seen[-6:])  # real DataLoader workers split the same way
    assert sorted(seen) == everything and len(set(seen)) == 12


def test_too_few_shards_raise_or_resample(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="1 clip shard.*2 process"):
        clip_loader(shards / "val", batch_size=2)  # 3 clips in one shard
    loader = clip_loader(shards / "val", batch_size=2, epoch_size=5)
    assert len(loader) == 3
    for _ in range(2):
        batches = list(loader)
        assert [len(b["run_id"]) for b in batches] == [2, 2, 2] and all(b["split"] == ["val"] * 2 for b in batches)


def test_clear_errors(smoke_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        CorpusClips(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match=r"split 'training'.*\['test', 'train', 'val'\]"):
        CorpusClips(smoke_corpus, "training")
    with pytest.raises(ValueError, match="not-a-run"):
        CorpusClips(smoke_corpus, "train", runs=["not-a-run"])
    with pytest.raises(FileNotFoundError, match="no clip shards"):
        clip_loader(tmp_path, batch_size=2)


def test_clips_never_touch_privileged_data(smoke_corpus, tmp_path, privileged_watch):
    """Corrupt every privileged group of a copied corpus: clips are identical and nothing fails; and an
    audit hook sees no file or directory under privileged/ opened or listed by the clip path."""
    copy = copy_without_privileged(smoke_corpus, tmp_path / "smoke")
    with privileged_watch:
        clips = CorpusClips(copy, None)
        items = [clips[k] for k in range(len(clips))]
        export_shards(copy, tmp_path / "shards", shard_size=50)
        streamed = _unbatch(clip_loader(tmp_path / "shards" / "test", batch_size=5))
    assert privileged_watch.touched == []
    original = CorpusClips(smoke_corpus, None)
    assert len(items) == len(original) and all(_same_item(a, original[k]) for k, a in enumerate(items))
    assert len(streamed) == 12


def test_clip_module_names_no_privileged_access():
    tree = ast.parse((ROOT / "pretrain" / "clips.py").read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)] + [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
    assert not [x for x in names + strings if "privileged" in x.lower()]
    assert "zarr" not in names  # stores are read only through capture.store.RunStore
