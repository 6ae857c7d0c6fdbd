"""Clips: the windows of a corpus that Dynamics-MAE and TEViD read (docs/architecture.md §5, §7, §9; paper Sec. 4.2-4.3).

A clip is the causal window ending at frame t: frames t-T+1 .. t `(T, 6, S, S)` bf16 and the raw
readouts `CLIP_READOUTS` of the same frames `(T, 8)`, with a target from the run's label, onset and
trigger (`window_targets`; rules in docs/clips.md). Windows exist only for t >= T-1 (no padding).

Two readers: `CorpusClips`, a map-style dataset straight from the zarr stores (small corpora), and
`export_shards` + `clip_loader`, webdataset tar shards streamed with shuffling and split over
processes and dataloader workers. Both read a store only through `capture.store.RunStore` (public
arrays and attributes): the privileged group of a run never enters a clip.

    python -m pretrain.clips export --corpus outputs/corpus/cpu --out outputs/clips/cpu [--window 10 --stride 1]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from capture.corpus import corpus_runs
from capture.relative import (REPRESENTATIONS, RelativeConfig, interval_losses, relative_config_of, relative_frames, spaced_weight_steps,
                              share_columns, spaced_shares, weight_step_column)
from capture.schema import CLASSES, CLIP_READOUTS, IGNORE, UNSCORED_LABELS
from capture.store import RunStore, bf16_to_bits, bits_to_bf16


@dataclass
class ClipConfig:
    window: int = 10  # T frames; the window ending at frame t holds frames t-9..t (causal)
    stride: int = 1  # windows end every `stride` frames
    horizon_epochs: float = 2.0  # H of docs/architecture.md §9, in epochs (store attr epoch_steps = steps per epoch)
    # "frames": the stored frames (T, 6, S, S) and raw readouts (T, 8); "relative": the run-relative inputs
    # of capture.relative, unit patterns (T, 6, P, P) under `frames` and scalars (T, 81) under `readouts`
    representation: str = "frames"
    # frame spacings: k reads every k-th stored frame (0, k, 2k, ...), the run as a monitor with a k times
    # coarser cadence sees it (relative inputs computed on that subsequence); one pass per spacing. Relative only.
    spacings: tuple = (1,)
    reference_lag: int = 0  # relative: capture.relative.RelativeConfig.reference_lag (0: the run's start)
    history_rate: float = 0.03  # relative: RelativeConfig.history_rate and peak_decay (the run-so-far traces)
    peak_decay: float = 0.05
    best_decay: float = 0.0  # relative: RelativeConfig.best_decay (0: loss_above_best against the run's lowest loss)
    best_from_steps: bool = False  # relative: RelativeConfig.best_from_steps (loss_above_best from the steps' median loss)
    # a run whose label is the class its perturbation injected: its class from the injection's onset on, not
    # from trigger - H (the windows between are then that class, not IGNORE): the class head sees the
    # anomaly's first windows, which the anomaly head alarms on (a task switch's loss jump, say)
    class_from_onset: bool = False

    def relative_config(self) -> RelativeConfig:
        return relative_config_of(self)

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"ClipConfig.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        self.spacings = tuple(int(k) for k in self.spacings)
        if not self.spacings or min(self.spacings) < 1 or len(set(self.spacings)) != len(self.spacings):
            raise ValueError(f"ClipConfig.spacings must be distinct integers >= 1, got {self.spacings!r}")
        if self.spacings != (1,) and self.representation != "relative":
            raise ValueError(f"ClipConfig.spacings={self.spacings} needs representation='relative' (the stored frames "
                             "are read at the stored cadence)")


def window_targets(frame_step, label, onset_step, trigger_step, epoch_steps, novel, cfg=ClipConfig(), from_onset: bool = False):
    """Target of the window ending at each frame (docs/architecture.md §9), and a mask of the novel windows.

    novel run: s < onset -> 0, s >= onset -> IGNORE with novel_mask (known-vs-novel AUROC only);
    label healthy -> 0; label None / underperforming -> IGNORE; known anomaly class c with onset o and
    trigger g: s < o -> 0, o <= s < max(o, g - H) -> IGNORE, s >= max(o, g - H) -> c (from o if g is None),
    with H = horizon_epochs * epoch_steps. An onset of None counts as 0 (from the start). `from_onset`: a
    known anomaly's class from o on (no IGNORE stretch).
    """
    s = torch.as_tensor(frame_step, dtype=torch.long)
    target = torch.zeros(len(s), dtype=torch.long)
    onset = 0 if onset_step is None else onset_step
    if novel:
        novel_mask = s >= onset
        target[novel_mask] = IGNORE
        return target, novel_mask
    novel_mask = torch.zeros(len(s), dtype=torch.bool)
    if label in UNSCORED_LABELS:
        target[:] = IGNORE
    elif label in CLASSES[1:]:
        start = onset
        if trigger_step is not None and not from_onset:
            if not epoch_steps:
                raise ValueError(f"label {label!r} with a trigger step needs epoch_steps (steps per epoch), got {epoch_steps!r}")
            start = max(onset, trigger_step - cfg.horizon_epochs * epoch_steps)
        target[s >= onset] = IGNORE
        target[s >= start] = CLASSES.index(label)
    elif label != "healthy":
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES + UNSCORED_LABELS}")
    return target, novel_mask


def window_anomalous(frame_step, label, onset_step, novel) -> torch.Tensor:
    """The binary target of the window ending at each frame (TEViD's anomaly head): 0 for a Healthy run and
    before the onset of a known-anomaly run, 1 from the onset on (the stretch before trigger - H that
    `window_targets` ignores included), IGNORE for unscored labels and for a novel run from its onset
    (novel runs are for the open-set metrics, not for training)."""
    s = torch.as_tensor(frame_step, dtype=torch.long)
    onset = 0 if onset_step is None else onset_step
    out = torch.zeros(len(s), dtype=torch.long)
    if novel:
        out[s >= onset] = IGNORE
    elif label in UNSCORED_LABELS:
        out[:] = IGNORE
    elif label in CLASSES[1:]:
        out[s >= onset] = 1
    elif label != "healthy":
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES + UNSCORED_LABELS}")
    return out


def _onset(attrs: dict) -> tuple[int | None, bool]:
    """(onset step, novel) from a store's public attrs; a novel run's onset is its perturbation's onset
    (the labeler leaves onset_step null when no rule fires)."""
    pert = attrs.get("perturbation") or {}
    novel = pert.get("kind") == "novel"
    onset = attrs.get("onset_step")
    if onset is None and novel:
        onset = pert.get("onset", 0)
    return onset, novel


def run_targets(attrs: dict, frame_step, cfg=ClipConfig()):
    """`window_targets` from a store's public attrs."""
    onset, novel = _onset(attrs)
    injected = (attrs.get("perturbation") or {}).get("injected")
    from_onset = cfg.class_from_onset and injected is not None and injected == attrs.get("label")
    return window_targets(frame_step, attrs.get("label"), onset, attrs.get("trigger_step"), attrs.get("epoch_steps"), novel, cfg,
                          from_onset=from_onset)


def run_anomalous(attrs: dict, frame_step) -> torch.Tensor:
    """`window_anomalous` from a store's public attrs."""
    onset, novel = _onset(attrs)
    return window_anomalous(frame_step, attrs.get("label"), onset, novel)


@dataclass
class _Run:
    """The small per-frame arrays of one run, loaded once."""
    record: dict
    path: Path
    steps: np.ndarray  # (n_frames,) int64
    readouts: np.ndarray  # (n_frames, 8) float32, raw
    target: np.ndarray  # (n_frames,) int64: target of the window ending at each frame
    anomalous: np.ndarray  # (n_frames,) int64: binary target of that window (window_anomalous)
    novel: np.ndarray  # (n_frames,) bool
    label: str
    patterns: torch.Tensor | None = None  # relative representation: (n_frames, 6, P, P) unit patterns
    spacing: int = 1  # every `spacing`-th stored frame (ClipConfig.spacings); end_frame counts these frames

    def ends(self, cfg: ClipConfig) -> range:
        return range(cfg.window - 1, len(self.steps), cfg.stride)

    def item(self, t: int, frames: torch.Tensor, window: int) -> dict:
        return dict(frames=frames, readouts=torch.from_numpy(self.readouts[t - window + 1:t + 1].copy()),
                    target=int(self.target[t]), anomalous=int(self.anomalous[t]), novel=bool(self.novel[t]), run_id=self.record["run_id"],
                    end_frame=t, end_step=int(self.steps[t]), split=self.record["split"], label=self.label)


def _load_runs(corpus: Path, record: dict, cfg: ClipConfig) -> tuple[list[_Run], RunStore]:
    """One `_Run` per spacing k of `cfg.spacings`: the store's frames 0, k, 2k, ... with their targets, and
    for the relative representation the run-relative inputs computed on that subsequence (one store read)."""
    store = RunStore(corpus / record["store"])
    names = store.readout_names
    missing = [k for k in CLIP_READOUTS if k not in names]
    if missing:
        raise ValueError(f"run store {store.path}: readouts {missing} missing (it has {names})")
    steps = store.frame_step().numpy()
    all_readouts = store.readouts().numpy()
    readouts = all_readouts[:, [names.index(k) for k in CLIP_READOUTS]]
    label = store.attrs.get("label") or "unlabeled"
    relative = cfg.representation == "relative"
    if relative:
        if not store.has_summaries:
            raise ValueError(f"run store {store.path}: no levels / patterns (store layout {store.attrs.get('tevid_layout', 1)}); "
                             "the relative representation needs a corpus captured with them (layout 2)")
        levels, patterns = store.levels(), store.patterns()
        train_loss = store.train_loss()  # every step's: the losses between the frames read (capture.relative)
        weight_step = weight_step_column(all_readouts, names)  # older stores: None
        shares = share_columns(all_readouts, names)  # older stores: fewer or none
    runs = []
    for k in cfg.spacings:
        idx = np.arange(0, len(steps), k)
        target, novel = run_targets(store.attrs, steps[idx], cfg)
        values, pats = readouts[idx], None
        if relative:
            pats, scalars = relative_frames(levels[idx], patterns[idx], torch.from_numpy(values), int(store.attrs["num_classes"]),
                                            cfg.relative_config(), interval_losses(train_loss, steps[idx]),
                                            None if weight_step is None else spaced_weight_steps(weight_step, idx),
                                            spaced_shares(shares, idx))
            values = scalars.numpy()
        runs.append(_Run(record, store.path, steps[idx], values, target.numpy(), run_anomalous(store.attrs, steps[idx]).numpy(),
                         novel.numpy(), label, pats, k))
    return runs, store


class CorpusClips(torch.utils.data.Dataset):
    """Every window of the usable runs of `split` (None: all splits), read from the zarr stores.

    items: frames `(T, 6, S, S)` bf16, readouts `(T, 8)` float32 raw (NaN kept), target, novel,
    run_id, end_frame, end_step, split, label. Batch them with `collate`. With `cfg.representation =
    "relative"`, frames are the unit patterns `(T, 6, P, P)` float32 and readouts the relative scalars
    `(T, 81)` of `capture.relative` (computed once per run when it is loaded: a few kB a run). Whole runs of frames are
    kept in memory after their first read until `cache_bytes` (per process) is used up: one zarr
    read per window costs ~5 ms, one per run is amortised over all its windows. With `cfg.spacings`
    (relative only), each run is read once per spacing k, every k-th frame, and its windows follow.
    """

    def __init__(self, corpus, split: str | None, cfg: ClipConfig = ClipConfig(), runs: list[str] | None = None,
                 cache_bytes: int = 512 * 2**20):
        self.corpus, self.split, self.cfg, self.cache_bytes = Path(corpus), split, cfg, cache_bytes
        self.runs = corpus_runs(self.corpus, split, runs)
        loaded = [_load_runs(self.corpus, r, cfg) for r in self.runs]
        self._runs = [run for runs, _ in loaded for run in runs]  # one per run and spacing
        self._stores = {i: store for i, (_, store) in enumerate(loaded)} if cfg.spacings == (1,) else {}  # frames only
        self._frames: dict[int, torch.Tensor] = {}  # run index -> all its frames
        self._cached = 0
        self.index = [(i, t) for i, run in enumerate(self._runs) for t in run.ends(cfg)]

    def __len__(self) -> int:
        return len(self.index)

    def targets(self) -> np.ndarray:
        """(len,) int64: the target of every window, in item order, without reading any frame."""
        return np.array([int(self._runs[i].target[t]) for i, t in self.index], dtype=np.int64)

    def window_runs(self) -> np.ndarray:
        """(len,) object: the run_id of every window, in item order."""
        return np.array([self._runs[i].record["run_id"] for i, _ in self.index], dtype=object)

    def __getitem__(self, k: int) -> dict:
        i, t = self.index[k]
        start = t - self.cfg.window + 1
        run = self._runs[i]
        if run.patterns is not None:  # relative: the run's inputs were computed when it was loaded
            return run.item(t, run.patterns[start:t + 1].clone(), self.cfg.window)
        if i not in self._frames:
            if i not in self._stores:
                self._stores[i] = RunStore(self._runs[i].path)
            store = self._stores[i]
            run_bytes = len(store) * 6 * store.frame_size**2 * 2
            if self._cached + run_bytes > self.cache_bytes:
                return self._runs[i].item(t, store.frames(start, t + 1), self.cfg.window)  # (T, 6, S, S)
            self._frames[i], self._cached = store.frames(), self._cached + run_bytes  # (n_frames, 6, S, S)
        return self._runs[i].item(t, self._frames[i][start:t + 1].clone(), self.cfg.window)

    def __getstate__(self) -> dict:  # spawned dataloader workers open their own stores and caches
        return {**self.__dict__, "_stores": {}, "_frames": {}, "_cached": 0}


def collate(items: list[dict]) -> dict:
    """Stack clips: frames `(B, T, 6, S, S)` bf16, readouts `(B, T, 8)`, target `(B,)` long, novel `(B,)` bool,
    end_frame/end_step `(B,)` long; run_id, split, label stay lists."""
    batch = {"frames": torch.stack([x["frames"] for x in items]), "readouts": torch.stack([x["readouts"] for x in items])}
    for key, dtype in (("target", torch.long), ("anomalous", torch.long), ("novel", torch.bool), ("end_frame", torch.long),
                       ("end_step", torch.long)):
        batch[key] = torch.tensor([x[key] for x in items], dtype=dtype)
    for key in ("run_id", "split", "label"):
        batch[key] = [x[key] for x in items]
    return batch


# ------------------------------------------------------------------ webdataset shards
META_KEYS = ("target", "anomalous", "novel", "run_id", "end_frame", "end_step", "split", "label")


def export_shards(corpus, out_dir, cfg: ClipConfig = ClipConfig(), shard_size: int = 2000, *,
                  mix_runs: int = 16, seed: int = 0, overwrite: bool = False) -> dict:
    """Write every window of the corpus to `out_dir/<split>/clips-%06d.tar` and `out_dir/index.json`.

    Runs are taken in a seeded random order, `mix_runs` at a time, and the windows of those runs
    are written in random order, so a shard mixes runs (memory: `mix_runs` runs of frames).
    Returns the counts per split x target name (plus `ignore`, `novel` and `total`).
    """
    corpus, out = Path(corpus), Path(out_dir)
    records = corpus_runs(corpus)
    if (out / "index.json").exists() or any(out.glob("*/clips-*.tar")):
        if not overwrite:
            raise FileExistsError(f"{out} already holds exported clips (pass overwrite=True / --overwrite to replace them)")
        for old in out.glob("*/clips-*.tar"):
            old.unlink()
    rng = random.Random(seed)
    counts, shards = {}, {}
    bar = tqdm(total=len(records), desc="exporting runs", unit="run", file=sys.stderr)
    for split in sorted({r["split"] for r in records}):
        todo = [r for r in records if r["split"] == split]
        rng.shuffle(todo)
        (out / split).mkdir(parents=True, exist_ok=True)
        c = counts[split] = {name: 0 for name in (*CLASSES, "ignore", "novel", "total")}
        with wds.ShardWriter(str(out / split / "clips-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for first in range(0, len(todo), mix_runs):
                group = []
                for record in todo[first:first + mix_runs]:
                    [run], store = _load_runs(corpus, record, cfg)  # frames: the stored cadence alone
                    bits = bf16_to_bits(store.frames())  # (n_frames, 6, S, S) uint16
                    group += [(run, bits, t) for t in run.ends(cfg)]
                    bar.update()
                rng.shuffle(group)
                for run, bits, t in group:
                    item = run.item(t, None, cfg.window)
                    key = re.sub(r"[^A-Za-z0-9_-]", "_", item["run_id"]) + f"_{t:06d}"  # wds keys: no dots
                    sink.write({"__key__": key, "frames.npy": bits[t - cfg.window + 1:t + 1],
                                "readouts.npy": item["readouts"].numpy(), "json": {k: item[k] for k in META_KEYS}})
                    c["ignore" if item["target"] == IGNORE else CLASSES[item["target"]]] += 1
                    c["novel"] += item["novel"]
                    c["total"] += 1
        shards[split] = sorted(p.name for p in (out / split).glob("clips-*.tar"))
    bar.close()
    index = {"corpus": str(corpus.resolve()), "clip_config": asdict(cfg), "shard_size": shard_size,
             "classes": list(CLASSES), "readouts": list(CLIP_READOUTS), "counts": counts, "shards": shards}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(out / "index.json")
    return counts


def _shard_urls(shards) -> list[str]:
    if isinstance(shards, (list, tuple)):
        urls = [str(s) for s in shards]
    elif Path(shards).is_dir():
        if (Path(shards) / "index.json").exists():
            raise ValueError(f"{shards} is an export root; pass one split's directory, e.g. {Path(shards) / 'train'}")
        urls = sorted(str(p) for p in Path(shards).glob("clips-*.tar"))
    else:
        urls = wds.shardlists.expand_urls(str(shards))  # a file or a brace pattern
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        raise FileNotFoundError(f"no clip shards at {shards}" + (f" (missing: {missing[:3]})" if missing else ""))
    return urls


def _decode(sample: dict) -> dict:
    meta = json.loads(sample["json"])
    frames = bits_to_bf16(np.load(io.BytesIO(sample["frames.npy"]), allow_pickle=False))
    readouts = torch.from_numpy(np.load(io.BytesIO(sample["readouts.npy"]), allow_pickle=False))
    meta.setdefault("anomalous", IGNORE)  # shards exported before the anomaly target: not trained on
    return {"frames": frames, "readouts": readouts, **{k: meta[k] for k in META_KEYS}}


def _shuffle(src, bufsize: int, seed: str):
    """Buffer shuffle seeded by (seed, epoch, rank, worker): reproducible, different per epoch and worker."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng, buf = random.Random(f"{seed}:{rank}:{worker}"), []
    for x in src:
        buf.append(x)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ClipLoader:
    """Iterable of collated batches over clip shards; each `iter()` is one epoch (see `clip_loader`)."""

    def __init__(self, urls, batch_size, shuffle, num_workers, seed, epoch_size):
        self.urls, self.batch_size, self.shuffle, self.num_workers = urls, batch_size, shuffle, num_workers
        self.seed, self.epoch_size, self.epoch = seed, epoch_size, 0
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        readers = world * max(1, num_workers)
        if epoch_size is None and len(urls) < readers:
            raise ValueError(f"{len(urls)} clip shard(s) cannot be split over {world} process(es) x {max(1, num_workers)} "
                             f"worker(s): export with a smaller --shard-size, use fewer workers, or pass epoch_size= "
                             f"to stream resampled shards")

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        seed = f"{self.seed}:{epoch}"
        if self.epoch_size is None:  # exact: every clip once per epoch, shards dealt out by rank then worker
            stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker]
            if self.shuffle:
                stages.append(partial(_shuffle, bufsize=len(self.urls), seed="shards:" + seed))
        else:  # resampled: shards drawn with replacement, seeded per rank and worker; never runs dry
            stages = [wds.ResampledShards(self.urls, seed=self.seed + 7919 * epoch, deterministic=True)]
        stages.append(wds.tarfile_to_samples())
        if self.shuffle:
            stages.append(partial(_shuffle, bufsize=self.shuffle, seed="clips:" + seed))
        stages += [wds.map(_decode), wds.batched(self.batch_size, collation_fn=collate, partial=True)]
        return wds.DataPipeline(*stages)

    def __len__(self) -> int:
        if self.epoch_size is None:  # TypeError: list() and tqdm then fall back to no length
            raise TypeError("an exact ClipLoader has no length (shards are read as they come); pass epoch_size= for one")
        return -(-self.epoch_size // self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        loader = wds.WebLoader(self.pipeline(epoch), batch_size=None, num_workers=self.num_workers)
        yield from (loader if self.epoch_size is None else islice(loader, len(self)))


def clip_loader(shards, batch_size: int, *, shuffle: int = 1000, num_workers: int = 0, seed: int = 0,
                epoch_size: int | None = None) -> ClipLoader:
    """Stream collated batches (keys of `collate`) from clip shards: a split's directory, a list, or a pattern.

    `epoch_size=None` (exact): shards split over processes (`wds.split_by_node`, rank from RANK /
    WORLD_SIZE or torch.distributed) then dataloader workers (`wds.split_by_worker`), shuffled, so
    each clip is read once per epoch by exactly one reader; needs shards >= processes x workers (else
    ValueError), and ranks may get unequal batch counts. `epoch_size=N`: every process draws shards
    with replacement and yields exactly ceil(N / batch_size) full batches per epoch, the safe choice
    for DDP training. `shuffle` is the sample buffer (0: file order, no shard shuffle either).
    """
    return ClipLoader(_shard_urls(shards), batch_size, shuffle, num_workers, seed, epoch_size)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description="Clips of a corpus as webdataset shards (docs/clips.md)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write out/<split>/clips-%%06d.tar and out/index.json")
    e.add_argument("--corpus", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--window", type=int, default=ClipConfig.window)
    e.add_argument("--stride", type=int, default=ClipConfig.stride)
    e.add_argument("--horizon-epochs", type=float, default=ClipConfig.horizon_epochs)
    e.add_argument("--shard-size", type=int, default=2000)
    e.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    cfg = ClipConfig(window=args.window, stride=args.stride, horizon_epochs=args.horizon_epochs)
    counts = export_shards(args.corpus, args.out, cfg, args.shard_size, overwrite=args.overwrite)
    names = list(next(iter(counts.values()), {}))
    print("| split | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for split, c in counts.items():
        print(f"| {split} | " + " | ".join(str(c[n]) for n in names) + " |")
    print(f"index: {Path(args.out) / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
