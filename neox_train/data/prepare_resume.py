"""Continuing an interrupted `neox-data prepare`: what identifies a prepare (its inputs, options and
tokenizer, hashed into a signature), the progress.json checkpoint it keeps in its staging folder,
and the check that what a checkpoint names is still there before a run continues from it.

Its own module because resuming is a concern apart from tokenizing: prepare.py decides what to
write, this module decides whether a staging folder left by an earlier run can be trusted and
records how far a run got (the writers' own state comes from data.writers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from neox_train.data.shards import META_FILE, TOKENIZER_FILE

PROGRESS_FILE = "progress.json"


def _progress_of(staging: Path, signature: str) -> dict | None:
    """The progress this same prepare (same inputs and options) left in `staging`, or None."""
    try:
        state = json.loads((staging / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("signature") == signature else None


def finished(staging: Path, signature: str) -> dict | None:
    """The meta of a prepare that finished writing into `staging` but was stopped while moving it
    in."""
    state = _progress_of(staging, signature)
    try:
        return ({**json.loads((staging / META_FILE).read_text()),
                 "resumed_documents": state["documents"]}
                if state and state.get("finished") else None)
    except (OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class Options:
    inputs: tuple[str, ...]
    tokenizer_path: Path | None
    vocab_size: int
    shard_tokens: int
    format: str
    text_key: str
    workers: int
    progress: bool


def signature_of(opts: Options) -> str:
    """What must match for a staging folder to be continued: inputs (with sizes and times), options,
    tokenizer."""
    def stat(spec: str) -> list:
        path = Path(spec)
        if not path.exists():
            return [spec]
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [spec] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    tokenizer = (hashlib.sha256(opts.tokenizer_path.read_bytes()).hexdigest()
                 if opts.tokenizer_path and opts.tokenizer_path.is_file() else None)
    key = {"inputs": [stat(s) for s in opts.inputs], "tokenizer": tokenizer,
           "vocab_size": opts.vocab_size, "shard_tokens": opts.shard_tokens, "format": opts.format,
           "text_key": opts.text_key}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def resume_state(staging: Path, signature: str) -> dict | None:
    state = _progress_of(staging, signature)
    if (state and (staging / TOKENIZER_FILE).is_file() and not state.get("finished")
            and _files_hold(staging, state)):
        return state
    for child in staging.iterdir():  # another prepare's leftovers: start over
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    return None


def _files_hold(staging: Path, state: dict) -> bool:
    """The checkpoint's files are all there, at least as long as it says (else start over)."""
    writer = state.get("writer") or {}
    if any(not (staging / name).is_file() for name in writer.get("shards", [])):
        return False
    if "documents" in writer:  # the indexed writer: data.bin and its sizes side file
        data, sizes = staging / "data.bin", staging / "data.sizes"
        return (data.is_file() and sizes.is_file()
                and sizes.stat().st_size >= 4 * writer["documents"]
                and data.stat().st_size >= writer["durable_tokens"] * writer.get("itemsize", 1))
    return True


def write_progress(staging: Path, state: dict) -> None:
    tmp = staging / f"{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, staging / PROGRESS_FILE)
