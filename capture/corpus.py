"""A corpus on disk: run stores under `runs/` and `manifest.jsonl`, one JSON record per planned run
(written by `factory.generate.write_manifest`; docs/architecture.md, "Corpus").

Every reader of a corpus goes through here, so there is one rule for which runs count:

    usable  status "complete" or "diverged" (a run that blew up is data: its frames up to the
            divergence are stored and labelled) and a store path
    not     status "failed" (the run raised; its record keeps the error, it has no store), or any
            other or missing status (a record this code does not know how to read)

`read_manifest(corpus)` returns every record (reports count the failed ones); `corpus_runs(corpus,
split, runs)` the usable ones of a split. Standard library only.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MANIFEST", "USABLE_STATUSES", "corpus_runs", "is_usable", "read_manifest"]

MANIFEST = "manifest.jsonl"
USABLE_STATUSES = ("complete", "diverged")


def read_manifest(corpus: str | Path) -> list[dict]:
    """Every record of `corpus/manifest.jsonl`, in manifest order."""
    path = Path(corpus) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {corpus} is not a corpus written by factory.generate "
                                "(or its generation has not finished)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_usable(record: dict) -> bool:
    """The one rule for a run that readers may use (module docstring)."""
    return record.get("status") in USABLE_STATUSES and bool(record.get("store"))


def corpus_runs(corpus: str | Path, split: str | None = None, runs: list[str] | None = None) -> list[dict]:
    """Manifest records of the usable runs of `split` (None: every split), in manifest order, or in the
    order of `runs` (run ids, each of which must be a usable run of `split`)."""
    usable = [r for r in read_manifest(corpus) if is_usable(r)]
    where = Path(corpus) / MANIFEST
    if split is not None:
        present = sorted({r["split"] for r in usable})
        if split not in present:
            raise ValueError(f"split {split!r} has no usable runs in {where}; splits present: {present}")
        usable = [r for r in usable if r["split"] == split]
    if runs is not None:
        by_id = {r["run_id"]: r for r in usable}
        missing = [r for r in runs if r not in by_id]
        if missing:
            raise ValueError(f"run(s) {missing} are not usable runs of split {split!r} in {where}")
        usable = [by_id[r] for r in runs]
    return usable
