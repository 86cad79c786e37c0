"""The one checkpoint tag format: `global_stepN` (DeepSpeed's own), in save dirs, buckets and
conversions alike, and the side files neox-train adds to every tag folder (so a tag is
self-describing: conversion needs nothing else)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from neox_train.data.shards import META_FILE, TOKENIZER_FILE
from neox_train.errors import NeoxError, read_json_object

TAG_RE = re.compile(r"^global_step(\d+)$")
RUN_JSON = "run.json"  # the run and DeepSpeed configs, data position, run id, last losses
CONFIG_JSON = "config.json"  # the HF model config
# Copied from the data folder into every tag, so a checkpoint converted elsewhere (from a bucket)
# still carries the tokenizer it was trained with.
DATA_SIDE_FILES = (TOKENIZER_FILE, META_FILE)


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def step_of_tag(tag: str) -> int | None:
    """N of `global_stepN`; None for anything else (step 0 is a step: test with `is None`)."""
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def sort_key(tag: str) -> tuple[int, str]:
    """Tags by step number (global_step9 before global_step10); other names first."""
    step = step_of_tag(tag)
    return (-1 if step is None else step, tag)


def local_tags(save_dir: Path) -> list[str]:
    """Tag folders present in save_dir, complete or not, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted((p.name for p in save_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                  key=sort_key)


def read_tag_json(tag_dir: Path, name: str, *, error: type[NeoxError]) -> dict[str, Any] | None:
    """A tag's run.json or config.json (None when the tag has none), or `error` with one line when
    it is damaged."""
    return read_json_object(Path(tag_dir) / name,
                            what=f"the {name} neox-train writes into every checkpoint tag",
                            error=error, missing_ok=True)
