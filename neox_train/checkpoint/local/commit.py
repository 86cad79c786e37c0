"""The local commit of a checkpoint: when a tag folder counts as saved.

DeepSpeed writes a tag's files (told not to write `latest`); then the rank that owns the folder
commits it:

  1. every file is fsynced, and its size and crc32c recorded;
  2. the completeness marker TAG/.neox-complete.json (those sizes and crc32cs, the run id) is
     written atomically: a temporary file, fsync, rename, fsync of the folder;
  3. SAVE_DIR/latest is replaced the same way.

So `latest` only ever names a tag whose files are durable, and a tag without a readable marker is
incomplete, whatever else is in it (a save killed half-way, a disk that filled): resume never uses
it, publication never uploads it, and the next save of that step replaces it. The marker doubles as
the tag's local manifest: a resume verifies every file against it before DeepSpeed reads a byte, and
the upload process takes its crc32cs instead of reading the files again.

Tags written before markers existed (their run.json has no run id) count as complete when their side
files parse: that version wrote run.json only after every rank's files were written.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local.tags import local_tags, step_of_tag
from neox_train.errors import NeoxError, read_json_object
from neox_train.remote.files import TMP_MARK, atomic_write, crc32c_of_file, fsync_dir

MARKER = ".neox-complete.json"
MARKER_VERSION = 1
LATEST = "latest"
HASH_WORKERS = 8


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32c: str
    # when it was hashed: lets the upload process trust the crc32c without reading the file again
    mtime_ns: int = 0


@dataclass(frozen=True)
class TagStatus:
    """What a tag folder holds, by the cheap checks (marker, file names and sizes; no file content
    read)."""

    tag: str
    complete: bool
    problem: str = ""  # why it is not usable ("" when complete)
    run_id: str | None = None
    files: dict[str, FileRecord] | None = None  # None: a tag from before markers (legacy)

    @property
    def legacy(self) -> bool:
        return self.complete and self.files is None


def tag_files(tag_dir: Path) -> list[tuple[str, Path]]:
    """(relative '/'-path, path) of a tag's checkpoint files, nested folders included: all but the
    marker and temporary files."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(tag_dir):
        dirnames.sort()
        for name in filenames:
            # a temporary file of an atomic write is never content
            if name == MARKER or TMP_MARK in name:
                continue
            path = Path(dirpath, name)
            out.append((path.relative_to(tag_dir).as_posix(), path))
    return sorted(out)


def _hash_and_sync(path: Path) -> FileRecord:
    with open(path, "rb") as f:
        # the data another rank (or DeepSpeed's writer) left in the page cache goes to disk
        os.fsync(f.fileno())
        st = os.fstat(f.fileno())
    return FileRecord(size=st.st_size, crc32c=crc32c_of_file(path), mtime_ns=st.st_mtime_ns)


def commit(save_dir: Path, tag: str, *, run_id: str | None, workers: int = HASH_WORKERS,
           known: dict[str, FileRecord] | None = None) -> TagStatus:
    """Make SAVE_DIR/TAG a complete checkpoint: fsync and hash its files, write its marker, point
    `latest` at it. Call once every rank's files of the tag are written (after
    `engine.save_checkpoint` returned).

    `known`: records of files their writer already fsynced and hashed (writer.DirectFile); a file
    whose size and mtime still match is taken as it is, never read again."""
    save_dir = Path(save_dir)
    tag_dir = save_dir / tag
    files = tag_files(tag_dir)
    known = known or {}
    records: dict[str, FileRecord] = {}
    todo: list[tuple[str, Path]] = []
    for rel, path in files:
        record = known.get(rel)
        st = path.stat()
        if record is not None and (record.size, record.mtime_ns) == (st.st_size, st.st_mtime_ns):
            records[rel] = record
        else:
            todo.append((rel, path))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo))),
                            thread_name_prefix="neox-commit") as pool:
        records.update(zip((rel for rel, _ in todo),
                           pool.map(_hash_and_sync, (p for _, p in todo))))
    _write_marker(tag_dir, tag, run_id, records)
    write_latest(save_dir, tag)
    return TagStatus(tag, True, run_id=run_id, files=records)


def _write_marker(tag_dir: Path, tag: str, run_id: str | None,
                  records: dict[str, FileRecord]) -> None:
    """The folders' entries durable first (the files were fsynced by the caller), then the
    marker."""
    for folder in {tag_dir.joinpath(*rel.split("/")).parent for rel in records} | {tag_dir}:
        fsync_dir(folder)
    marker = {
        "version": MARKER_VERSION,
        "tag": tag,
        "step": step_of_tag(tag),
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {rel: {"size": r.size, "crc32c": r.crc32c, "mtime_ns": r.mtime_ns}
                  for rel, r in sorted(records.items())},
    }
    atomic_write(tag_dir / MARKER, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())


def write_marker_from_manifest(tag_dir: Path, tag: str, files: dict[str, tuple[int, str]],
                               run_id: str | None) -> None:
    """The marker of a downloaded tag whose every file was verified against its published manifest
    and fsynced."""
    records = {rel: FileRecord(size, crc, tag_dir.joinpath(*rel.split("/")).stat().st_mtime_ns)
               for rel, (size, crc) in files.items()}
    _write_marker(tag_dir, tag, run_id, records)


def write_latest(save_dir: Path, tag: str) -> None:
    """SAVE_DIR/latest <- tag (DeepSpeed's format: the bare tag), atomically and durably."""
    atomic_write(Path(save_dir) / LATEST, tag.encode())


def read_latest(save_dir: Path) -> tuple[str | None, str]:
    """(the tag `latest` names, or None; what is wrong with it, for messages) — never raises on a
    damaged file."""
    path = Path(save_dir) / LATEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "is missing"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "is not text"
    if not text:
        return None, "is empty"
    if step_of_tag(text) is None:
        return None, f"names {text[:60]!r}, which is not a checkpoint tag"
    return text, ""


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None for a missing or damaged file: here that only means "not complete"."""
    try:
        return read_json_object(path, what="a checkpoint file", missing_ok=True)
    except NeoxError:
        return None


def _legacy_status(tag_dir: Path, tag: str) -> TagStatus:
    run = _read_json_object(tag_dir / "run.json")
    config = _read_json_object(tag_dir / "config.json")
    if run is not None and "run_id" not in run and "step" in run and config is not None:
        return TagStatus(tag, True)
    return TagStatus(tag, False, "it has no completeness marker (its save never finished)")


def inspect(save_dir: Path, tag: str) -> TagStatus:
    """Is SAVE_DIR/TAG complete? Reads the marker and lists the files (names and sizes), never their
    content."""
    tag_dir = Path(save_dir) / tag
    if not tag_dir.is_dir():
        return TagStatus(tag, False, "it does not exist")
    marker_path = tag_dir / MARKER
    if not marker_path.exists():
        return _legacy_status(tag_dir, tag)
    marker = _read_json_object(marker_path)
    try:
        records = {rel: FileRecord(int(m["size"]), str(m["crc32c"]), int(m.get("mtime_ns", 0)))
                   for rel, m in marker["files"].items()}
        run_id = marker.get("run_id")
    except (TypeError, KeyError, ValueError, AttributeError):
        return TagStatus(tag, False, f"its completeness marker {MARKER} is unreadable")
    present = {rel: path for rel, path in tag_files(tag_dir)}
    for rel, record in sorted(records.items()):
        path = present.get(rel)
        if path is None:
            return TagStatus(tag, False, f"{rel} is missing")
        size = path.stat().st_size
        if size != record.size:
            return TagStatus(tag, False, f"{rel} has {size} bytes, its marker says {record.size} "
                                         "(the file is damaged)")
    extra = sorted(set(present) - set(records))
    if extra:
        return TagStatus(tag, False,
                         f"{extra[0]} is not in its completeness marker (left by another save?)")
    return TagStatus(tag, True, run_id=run_id, files=records)


def verify(save_dir: Path, status: TagStatus, *, workers: int = HASH_WORKERS) -> str:
    """Read every file of a complete tag and compare its crc32c with the marker: "" when all match,
    else what differs. A legacy tag has nothing to compare with and passes."""
    if status.files is None:
        return ""
    tag_dir = Path(save_dir) / status.tag
    items = sorted(status.files.items())

    def check(item: tuple[str, FileRecord]) -> str:
        rel, record = item
        try:
            crc = crc32c_of_file(tag_dir.joinpath(*rel.split("/")))
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
        if crc == record.crc32c:
            return ""
        return f"{rel} has crc32c {crc}, its marker says {record.crc32c} (the file is damaged)"

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))),
                            thread_name_prefix="neox-verify") as pool:
        problems = [p for p in pool.map(check, items) if p]
    return problems[0] if problems else ""


def statuses(save_dir: Path) -> list[TagStatus]:
    """Every tag folder's status, oldest first."""
    return [inspect(save_dir, tag) for tag in local_tags(save_dir)]


def complete_tags(save_dir: Path) -> list[str]:
    return [s.tag for s in statuses(save_dir) if s.complete]


def remove_incomplete(save_dir: Path, tag: str) -> bool:
    """Before a save of `tag`: a folder of that name left by a save that never finished is removed
    (its files would mix with the new ones). A complete tag is never removed here. True when
    something was removed."""
    tag_dir = Path(save_dir) / tag
    if not tag_dir.exists() or inspect(save_dir, tag).complete:
        return False
    shutil.rmtree(tag_dir, ignore_errors=True)
    return True
