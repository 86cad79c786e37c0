"""`neox-data info PATH... [--config RUN] [--json]`: what a dataset holds before anything trains on
it.

A PATH is a folder of our shards and/or indexed datasets, one indexed PREFIX (or its .bin/.idx), or
a run-config JSON whose `data` mixture (or data_dir) is then described. For each dataset: files,
documents (indexed: from the index; shards: meta.json's count), tokens, dtypes, the largest token id
(the vocabulary bound, scanned once and cached like training's validation). With `--config`, each
dataset's share, samples and epochs by max_steps at that config's batch (`--gpus` ranks, default 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from neox_train.config import load_run_config
from neox_train.data import indexed
from neox_train.data.mixture import epochs_by, epochs_line
from neox_train.data.shards import (
    VALIDATION_CACHE,
    dataset_folder,
    discover_shards,
    max_token_ids,
    read_meta,
    validate_shards,
)


def describe(path: str, *, name: str | None = None, weight: float | None = None) -> dict[str, Any]:
    files = discover_shards(path)
    folder = dataset_folder(path)
    # The validation scan with an unbounded vocabulary: every id passes, the max per file is cached;
    # it opens (memory-maps) every file and hands the arrays back.
    arrays = validate_shards(files, 2**63 - 1, cache_path=folder / VALIDATION_CACHE)
    max_ids = max_token_ids(files, folder / VALIDATION_CACHE)
    documents: int | None = 0
    for f in files:
        if f.suffix == ".bin":
            documents += indexed.open_indexed(indexed.strip(f)).documents
        else:
            documents = None
            break
    meta = read_meta(path)
    if documents is None and meta and meta.get("num_documents") is not None:
        documents = int(meta["num_documents"])
    return {"name": name or Path(path).name, "path": str(path), "weight": weight,
            "format": sorted({"indexed" if f.suffix == ".bin" else "shards" for f in files}),
            "files": len(files), "documents": documents, "tokens": int(sum(a.size for a in arrays)),
            "dtypes": sorted({a.dtype.name for a in arrays}),
            "max_token_id": max((m for m in max_ids if m is not None), default=None),
            "vocab_size": meta.get("vocab_size") if meta else None}


def _datasets_of(spec: str) -> list[tuple[str, str | None, float | None]]:
    """(path, name, weight) of PATH, or of a run config's mixture."""
    if spec.endswith(".json") and Path(spec).is_file():
        run = load_run_config(spec)
        if run.data:
            return [(e["path"], e.get("name"), float(e["weight"])) for e in run.data]
        return [(run.data_dir, None, None)]
    return [(spec, None, None)]


def info(paths: list[str]) -> dict[str, Any]:
    datasets = [describe(p, name=n, weight=w) for spec in paths for p, n, w in _datasets_of(spec)]
    return {"datasets": datasets, "total_tokens": sum(d["tokens"] for d in datasets),
            "total_documents": None if any(d["documents"] is None for d in datasets)
            else sum(d["documents"] for d in datasets)}


def plan_rows(run, split, train_batch_size: int) -> dict[str, Any]:
    """Shares, samples and epochs by max_steps, from the windows training cuts
    (train.plan.load_data)."""
    samples = run.max_steps * train_batch_size
    if not run.data:
        n = len(split.train)
        rows = [{"name": Path(run.data_dir).name, "path": run.data_dir, "weight": 1.0,
                 "train_windows": n, "samples": samples, "epochs": samples / n}]
    else:
        rows = epochs_by(split, samples)
    return {"max_steps": run.max_steps, "train_batch_size": train_batch_size, "samples": samples,
            "datasets": rows, "line": epochs_line(rows, run.max_steps)}


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a shard folder, an indexed PREFIX (or .bin/.idx), or a run-config "
                             "JSON (its mixture)")
    parser.add_argument("--config", metavar="RUN",
                        help="a run config (preset or JSON): each dataset's share, "
                             "samples and epochs by its max_steps")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="ranks for --config's batch (default 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def print_info(result: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
        return 0
    for d in result["datasets"]:
        docs = f"{d['documents']:,}" if d["documents"] is not None else "?"
        print(f"{d['name']}: {d['path']} ({'+'.join(d['format'])}, {d['files']} file(s), "
              f"{'/'.join(d['dtypes'])}): {docs} documents, {d['tokens']:,} tokens, max token id "
              f"{d['max_token_id']}"
              + (f", weight {d['weight']:g}" if d["weight"] is not None else ""), file=sys.stderr)
    print(f"total: {result['total_tokens']:,} tokens", file=sys.stderr)
    if "plan" in result:
        print(f"by max_steps={result['plan']['max_steps']} at {result['plan']['train_batch_size']} "
              f"sequences per step: {result['plan']['line']}", file=sys.stderr)
    return 0
