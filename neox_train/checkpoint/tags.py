"""The one checkpoint tag format: `global_stepN` (DeepSpeed's own), in save dirs, buckets and conversions alike."""

from __future__ import annotations

import re
from pathlib import Path

TAG_RE = re.compile(r"^global_step(\d+)$")


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
    return sorted((p.name for p in save_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=sort_key)
