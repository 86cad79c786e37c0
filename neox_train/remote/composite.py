"""Parallel composite uploads (gsutil's name): a large file goes up as parts on concurrent
streams, and the bucket joins them into the final object (GCS compose).

Why compose and not the XML multipart API: compose is the JSON API the backend already speaks, with
the same client, retries and generation preconditions (the final name is written by one conditional
compose, as a one-stream upload writes it); gsutil has used it for years; the test server implements
it. The XML API would need a second protocol stack, which the test server lacks. Compose's limits:
at most 32 sources per request, so a file goes up in at most 32 parts (a 17 GB optimizer file at 16
streams: 16 parts of ~1 GB), and parts are real objects until they are deleted (with the bucket's
soft delete on, they are billed for its retention window: docs/checkpoints.md).

Integrity: each part is hashed by the client as it is sent and refused unless the bucket stored the
same crc32c; crc32c_combine joins the parts' crc32cs into the file's, which must equal the file's
known crc32c (when the caller has it) before compose, and the composed object's crc32c (the bucket
computes it) after.

Parts never look like checkpoint files: they are named PARTS_DIR/<upload id>/<index> at the root of
the backend, never under a tag, and GcsBackend.list skips PARTS_DIR, so the publication protocol,
retention, `neox-sync` and resume never see them. The parts journal (a local JSON-lines file)
records each upload id before its first part is sent, and again once its parts are deleted; the
next process that uploads through the same journal to the same URL deletes the parts of every
upload that began and never ended (a crash, a kill -9) before it sends anything.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from neox_train.errors import StorageError
from neox_train.remote.files import crc32c_combine, crc32c_text

PARTS_DIR = ".neox-parts"
MAX_COMPOSE_SOURCES = 32  # GCS's limit per compose request
# Files from this size up go in parts (below it one stream is within a second or two of the parts
# on any link, and every part costs requests: upload, compose, delete).
PARALLEL_MIN_BYTES = 32 << 20
# No part smaller than this: per-request overhead would eat what the parallelism gains.
PART_MIN_BYTES = 4 << 20
# A part above 8 MiB goes as a resumable upload in chunks of this size; each stream holds one chunk
# in memory, so an upload holds at most streams x PART_CHUNK_BYTES (16 x 32 MiB = 512 MiB).
PART_CHUNK_BYTES = 32 << 20


def default_journal_path() -> Path:
    """The parts journal of uploads that name none (neox-sync, neox-data): one per user, in
    $NEOX_CACHE_DIR, else $XDG_CACHE_HOME/neox-train, else ~/.cache/neox-train. A run's upload
    process uses its save dir's journal instead."""
    root = os.environ.get("NEOX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "neox-train")
    return Path(root) / "parts-journal.jsonl"


def plan_parts(size: int, streams: int, *, min_part: int = PART_MIN_BYTES) -> list[tuple[int, int]]:
    """(offset, length) of each part: as many parts as there are streams (at most
    MAX_COMPOSE_SOURCES, none under min_part), equal but for the last."""
    count = max(1, min(MAX_COMPOSE_SOURCES, streams, size // max(1, min_part)))
    length = -(-size // count)
    return [(start, min(length, size - start)) for start in range(0, size, length)] or [(0, 0)]


def new_upload_id() -> str:
    """Unique per upload, and sorted by time (a listing of PARTS_DIR reads oldest first)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"


def part_name(upload_id: str, index: int) -> str:
    return f"{PARTS_DIR}/{upload_id}/{index:02d}"


def is_part(name: str) -> bool:
    """A name under PARTS_DIR (relative to the backend root): never a file of anything."""
    return name == PARTS_DIR or name.startswith(f"{PARTS_DIR}/")


class FileRange(io.RawIOBase):
    """Bytes offset..offset+length of a file as a file of its own (positions relative to offset):
    what a part's upload reads, and seeks back in when the client resends a chunk. Nothing is read
    before it is asked for, so a part costs one chunk of memory, not its size."""

    def __init__(self, path: Path, offset: int, length: int):
        super().__init__()
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._offset, self._length, self._pos = offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = self._length - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class PartsJournal:
    """Which composite uploads this machine began and has not cleaned up, per backend URL: a local
    append-only JSON-lines file ({"begun": id, "url": url, "pid": pid, "host": host} before the
    first part, {"ended": id} once the parts are gone). One small O_APPEND write per record, so the
    threads and processes sharing a journal never tear each other's lines."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def begun(self, url: str, upload_id: str) -> None:
        self._append({"begun": upload_id, "url": url, "pid": os.getpid(), "process": _PROCESS,
                      "host": socket.gethostname(), "time": time.time()})

    def ended(self, upload_id: str) -> None:
        self._append({"ended": upload_id})

    def leftovers(self, url: str) -> list[str]:
        """Upload ids to `url` begun and never ended by a process that is gone. Not this process's
        own (another thread may be sending them now), nor a live one's on this host (a second
        `neox-sync` running now); a process whose pid this one now has is gone."""
        if not self.path.is_file():
            return []
        begun: dict[str, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill -9 mid-write
            if isinstance(rec.get("begun"), str) and rec.get("url") == url:
                begun[rec["begun"]] = rec
            elif isinstance(rec.get("ended"), str):
                begun.pop(rec["ended"], None)
        host = socket.gethostname()
        return [uid for uid, rec in begun.items() if rec.get("process") != _PROCESS and (
            rec.get("host") != host or rec.get("pid") == os.getpid()
            or not _alive(rec.get("pid")))]


# this process, in the journal: its pid alone could be a dead process's, reused
_PROCESS = uuid.uuid4().hex


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# (part name, local file, offset, length) -> the stored part's crc32c as an int
PutPart = Callable[[str, Path, int, int], int]


def send_parts(put_part: PutPart, local: Path, names: list[str], spans: list[tuple[int, int]],
               streams: int) -> int:
    """Every part on its own stream (at most `streams` at once). Returns the whole file's crc32c,
    combined from the parts' (each checked by the client as it was sent). The first failure cancels
    the parts not started and is raised."""
    with ThreadPoolExecutor(max_workers=max(1, min(streams, len(spans))),
                            thread_name_prefix="neox-part") as pool:
        futures = [pool.submit(put_part, name, local, offset, length)
                   for name, (offset, length) in zip(names, spans)]
        try:
            crcs = [fut.result() for fut in futures]
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    crc = 0
    for part_crc, (_offset, length) in zip(crcs, spans):
        crc = crc32c_combine(crc, part_crc, length)
    return crc


def crc_text(crc: int) -> str:
    return crc32c_text(crc.to_bytes(4, "big"))


def refuses_parts(retention_s: int | None, default_hold: bool | None,
                  storage_class: str | None) -> str:
    """Why a bucket should get one stream per file instead of parts, or "": under a retention
    policy or a default hold the parts cannot be deleted (they would stay, billed, for the retention
    period), and in a Nearline/Coldline/Archive bucket every part is billed its minimum storage
    duration (30-365 days) however soon it is deleted."""
    if retention_s:
        return (f"the bucket has a retention policy ({retention_s} s): parts could not be "
                "deleted")
    if default_hold:
        return ("the bucket puts a default event-based hold on new objects: parts could not be "
                "deleted")
    if storage_class and storage_class.upper() in ("NEARLINE", "COLDLINE", "ARCHIVE"):
        return (f"the bucket's storage class is {storage_class} (each part would be billed its "
                "minimum storage duration)")
    return ""


class ParallelUploads:
    """The composite path of one backend: when a file goes in parts, sending them, composing, and
    cleaning up (now, or in the next process when this one dies). `ops` is the backend: it supplies
    put_part, compose_parts, delete, list_parts, bucket_refusal() and refused(exc) (a 403: the
    bucket or the object does not allow what parts need), warn(line), and its url and streams."""

    def __init__(self, ops, journal: PartsJournal):
        self.ops, self.journal = ops, journal
        self.min_bytes = PARALLEL_MIN_BYTES
        self.min_part = PART_MIN_BYTES
        self.disabled = ""  # why this backend sends one stream per file from now on
        self._checked = False
        self._swept = False
        self._lock = threading.Lock()

    def sweep(self) -> None:
        """Once per backend, before its first upload: delete the parts of uploads to this URL that
        the journal says began and never ended."""
        with self._lock:
            if self._swept:
                return
            self._swept = True
        for upload_id in self.journal.leftovers(self.ops.url):
            self.remove(upload_id, self.ops.list_parts(f"{PARTS_DIR}/{upload_id}/"))

    def _fall_back(self, why: str) -> None:
        with self._lock:
            first = not self.disabled
            self.disabled = why
        if first:
            self.ops.warn(f"{self.ops.url}: {why}; large files go up in one stream each from "
                          "now on (slower; nothing else changes)")

    def _allowed(self) -> bool:
        with self._lock:
            check, self._checked = not self._checked, True
        if check:
            why = self.ops.bucket_refusal()
            if why:
                self._fall_back(f"no parallel uploads: {why}")
        return not self.disabled

    def upload(self, local: Path, name: str, *, size: int, crc32c: str | None,
               generation: int | None, unchanged: Callable[[], bool]):
        """Send `local` in parts and compose them into `name` (the write condition `generation`
        applies to the compose). Returns the stored object, or None when the file goes in one
        stream: too small, one stream in the budget, parts off, or a bucket that refuses them (one
        WARNING)."""
        if self.disabled or self.ops.streams < 2 or size < self.min_bytes or not self._allowed():
            return None
        spans = plan_parts(size, self.ops.streams, min_part=self.min_part)
        if len(spans) < 2:
            return None
        upload_id = new_upload_id()
        names = [part_name(upload_id, i) for i in range(len(spans))]
        where = f"{self.ops.url}/{name}"
        self.journal.begun(self.ops.url, upload_id)
        try:
            whole = crc_text(send_parts(self.ops.put_part, local, names, spans, self.ops.streams))
            if (crc32c is not None and whole != crc32c) or not unchanged():
                raise StorageError(f"{local} changed while it was uploaded to {where} (its parts "
                                   f"hash to crc32c {whole}, the file was {crc32c}); the upload "
                                   "was discarded", transient=True)
            return self.ops.compose_parts(names, name, generation=generation, size=size,
                                          crc32c=whole)
        except StorageError as e:
            if self.ops.refused(e):
                self._fall_back(f"parallel upload refused ({e})")
                return None
            raise
        finally:
            self.remove(upload_id, names)

    def remove(self, upload_id: str, names: list[str]) -> None:
        """Delete an upload's parts, on the streams (absent ones are fine); the journal forgets the
        upload once all are gone. A bucket that refuses to delete them gets no more parts (one
        WARNING)."""
        failures: list[StorageError] = []
        if names:
            with ThreadPoolExecutor(max_workers=max(1, min(self.ops.streams, len(names))),
                                    thread_name_prefix="neox-part-delete") as pool:
                failures = [e for e in pool.map(self._delete_part, names) if e is not None]
        if not failures:
            self.journal.ended(upload_id)
        # else the journal still names the upload: the next process deletes what is left
        refused = next((e for e in failures if self.ops.refused(e)), None)
        if refused is not None:
            self._fall_back(f"parts cannot be deleted ({refused}; "
                            f"{len(failures)} left under {PARTS_DIR}/{upload_id}/)")

    def _delete_part(self, part: str) -> StorageError | None:
        try:
            self.ops.delete(part, generation=None)
        except StorageError as e:
            return e
        return None
