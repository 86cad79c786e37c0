"""The upload journal: SAVE_DIR/.neox-sync/journal-node<k>.jsonl, append-only JSON lines.

{"queued": tag} is written by the Publisher before a tag is handed to the upload process,
{"published"|"skipped"|"failed": tag} by the upload process (or the inline publication). At start, a
tag is handed to the new upload process when its last record is queued or failed, or when it has
none at all (a complete checkpoint that was never queued: a kill between the commit and the journal
line), provided it is still complete on disk. The crc32c cache of each node lives next to its
journal.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local import commit

JOURNAL_DIR = ".neox-sync"


def journal_path(save_dir: Path, node_rank: int) -> Path:
    return Path(save_dir) / JOURNAL_DIR / f"journal-node{node_rank}.jsonl"


def crc_cache_path(save_dir: Path, node_rank: int) -> Path:
    return Path(save_dir) / JOURNAL_DIR / f"crc32c-node{node_rank}.json"


def append_journal(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record) + "\n"
    # One small O_APPEND write: atomic with respect to the other process appending to the same file.
    # No fsync: the page cache survives a killed process, which is what the journal is for, and on
    # ext4 an fsync right after a checkpoint write waits for that checkpoint's writeback (measured:
    # ~15 ms added to every save). A journal lost with the machine costs nothing: tags with no
    # record are handed over too (see journal_leftovers).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def journal_queued(save_dir: Path, node_rank: int, tag: str) -> None:
    """The trainer's record that `tag` is handed to the upload (background worker or inline)."""
    append_journal(journal_path(save_dir, node_rank), {"queued": tag, "time": time.time()})


def journal_published(save_dir: Path, node_rank: int, tag: str) -> None:
    """`tag` is published (its files are verified in the bucket): nothing to hand over."""
    append_journal(journal_path(save_dir, node_rank), {"published": tag, "time": time.time()})


JOURNAL_KINDS = ("queued", "published", "skipped", "failed")


def journal_state(save_dir: Path, node_rank: int) -> dict[str, str]:
    """tag -> the kind of its last journal record."""
    path = journal_path(save_dir, node_rank)
    if not path.is_file():
        return {}
    state: dict[str, str] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill -9 mid-write
        for kind in JOURNAL_KINDS:
            if isinstance(rec.get(kind), str):
                state[rec[kind]] = kind
    return state


def journal_leftovers(save_dir: Path, node_rank: int) -> list[str]:
    """Complete local tags an earlier run (or this one) left unpublished, oldest first: their last
    journal record is queued or failed, or they have none."""
    state = journal_state(save_dir, node_rank)
    return [t for t in commit.complete_tags(save_dir) if state.get(t) in (None, "queued", "failed")]
