"""Local files as the remote layer sees them: crc32c in the form GCS reports, a persistent crc32c
cache, atomic and durable writes, folders swapped into place."""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import google_crc32c

# temporary files (atomic writes of the local backend, of local commits); never listed
TMP_MARK = ".neox-tmp-"


READ_CHUNK = 1024 * 1024


def crc32c_text(digest: bytes) -> str:
    """A crc32c's 4 big-endian bytes in the form GCS reports (base64)."""
    return base64.b64encode(digest).decode("ascii")


def crc32c_of_file(path: Path) -> str:
    """The file's CRC32C as GCS reports it (base64 of the 4 big-endian bytes), read in 1 MiB
    chunks."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            checksum.update(chunk)
    return crc32c_text(checksum.digest())


_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


@functools.lru_cache(maxsize=64)
def _zeros_operator(length: int) -> tuple[int, ...]:
    """The GF(2) operator that appends `length` zero bytes to a crc (one per slice size: cached)."""
    op = [1 << i for i in range(32)]  # identity
    odd = [_CRC32C_POLY] + [1 << i for i in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while length:  # one zero byte is 8 bits: the squares below are 1, 2, 4, ... zero bytes
        even = _gf2_square(odd)
        if length & 1:
            op = [_gf2_times(even, column) for column in op]
        length >>= 1
        if not length:
            break
        odd = _gf2_square(even)
        if length & 1:
            op = [_gf2_times(odd, column) for column in op]
        length >>= 1
    return tuple(op)


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """The crc32c of A+B from crc32c(A), crc32c(B) and len(B), without the bytes (zlib's
    crc32_combine, for the Castagnoli polynomial): the slices of a download, hashed as each arrives,
    give the whole object's crc32c."""
    if len_b <= 0:
        return crc_a
    return _gf2_times(_zeros_operator(len_b), crc_a) ^ crc_b


class HashingWriter:
    """A binary file that hashes what is written to it: a download's crc32c, taken from the bytes
    as they arrive instead of reading the file back. A writer that went back (seek) would make the
    hash disagree with the file, and the caller's check then refuses it: it fails closed."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._checksum = google_crc32c.Checksum()
        self.written = 0

    def write(self, data: bytes) -> int:
        self._checksum.update(data)
        self.written += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    @property
    def crc32c(self) -> str:
        return crc32c_text(self._checksum.digest())

    @property
    def crc32c_int(self) -> int:
        return int.from_bytes(self._checksum.digest(), "big")


def stat_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def changed_since(path: Path, before: tuple[int, int]) -> bool:
    try:
        return stat_key(path) != before
    except OSError:
        return True


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old content or the new,
    never a torn one, and the new content is on disk when this returns (temporary file, fsync,
    rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class Crc32cCache:
    """CRC32C per file, keyed by (absolute path, size, mtime_ns) and persisted as JSON, so that
    re-syncing an unchanged multi-GB checkpoint reads no file content (the rsync quick check; a
    rewrite changes mtime_ns).

    Thread-safe: the sync threads share one cache. `hits` / `misses` count lookups since
    construction.
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else None
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._dirty = False
        self._entries: dict[str, tuple[int, int, str]] = {}
        if self.path is not None and self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self._entries = {k: (int(v[0]), int(v[1]), str(v[2]))
                                 for k, v in raw["files"].items()}
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                self._entries = {}  # a damaged cache only costs re-reading the files

    def get(self, path: Path | str) -> str:
        path = Path(path).absolute()
        st = os.stat(path)
        key = str(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
                self.hits += 1
                return entry[2]
            self.misses += 1
        crc = crc32c_of_file(path)
        with self._lock:
            self._entries[key] = (st.st_size, st.st_mtime_ns, crc)
            self._dirty = True
        return crc

    def peek(self, path: Path | str) -> str | None:
        """The cached crc32c if the file is unchanged since it was hashed, else None; never reads
        the file."""
        path = Path(path).absolute()
        st = os.stat(path)
        with self._lock:
            entry = self._entries.get(str(path))
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        return None

    def put(self, path: Path | str, size_mtime: tuple[int, int], crc: str) -> None:
        """Record a crc32c computed elsewhere (while uploading) for the file as it was at
        `size_mtime`."""
        with self._lock:
            self._entries[str(Path(path).absolute())] = (size_mtime[0], size_mtime[1], crc)
            self._dirty = True

    def save(self) -> None:
        """Write the cache (atomically), dropping entries of files that no longer exist (deleted
        checkpoints)."""
        if self.path is None:
            return
        with self._lock:
            live = {k: v for k, v in self._entries.items() if os.path.exists(k)}
            if not self._dirty and len(live) == len(self._entries):
                return
            self._entries = live
            payload = json.dumps({"files": {k: list(v) for k, v in live.items()}})
            self._dirty = False
        atomic_write(self.path, payload.encode())


def crc32c_of_bytes(data: bytes) -> str:
    return crc32c_text(google_crc32c.Checksum(data).digest())


def install_folder(staging: Path, final: Path) -> None:
    """Rename a finished folder into place: an existing `final` is moved aside first and deleted
    only once the new one is in place, so at every moment one complete folder (old or new) stands at
    `final`; the rename is made durable."""
    staging, final = Path(staging), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
