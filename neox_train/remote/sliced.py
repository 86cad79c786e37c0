"""Sliced downloads (gsutil's name): one large object as concurrent ranged reads into one file.

One stream from a VM tops out far below what a bucket serves, so a multi-GB checkpoint file comes
down in slices, each on its own stream. Every slice is hashed as its bytes arrive; crc32c_combine
joins the slices' crc32cs into the whole object's without reading the file back, and that must
equal what the bucket reports for the generation read. The backend supplies the ranged read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from neox_train.errors import StorageError
from neox_train.remote.base import RemoteFile
from neox_train.remote.files import HashingWriter, crc32c_combine, crc32c_text

# (name, generation, first byte, last byte, where to write) -> None
ReadRange = Callable[[str, int, int, int, HashingWriter], None]
# Objects of at least SLICED_MIN_BYTES come down in slices of at most SLICE_BYTES (a failed slice
# is read again whole: this bounds what a failure costs), smaller when that gives every stream one
# (a 256 MiB object on 16 streams: 16 slices of 16 MiB), never under MIN_SLICE_BYTES (each slice is
# a request: its latency must stay small next to its transfer).
SLICE_BYTES = 32 << 20
SLICED_MIN_BYTES = 32 << 20
MIN_SLICE_BYTES = 4 << 20


def slice_length(size: int, streams: int, max_bytes: int = SLICE_BYTES,
                 min_bytes: int = MIN_SLICE_BYTES) -> int:
    """The length of each slice of a `size`-byte object read on `streams` streams."""
    return max(1, min(max_bytes, max(min(min_bytes, max_bytes), -(-size // max(1, streams)))))


def sliceable(size: int, crc32c: str | None, content_encoding: str | None, min_bytes: int) -> bool:
    """Large enough, with a crc32c to check the slices against, and stored as it is served (a
    gzip-encoded object is served decompressed: byte ranges of it cannot be put together)."""
    return size >= min_bytes and bool(crc32c) and (content_encoding or "").lower() != "gzip"


def download_sliced(read_range: ReadRange, current: RemoteFile, tmp: Path, *, where: str,
                    slice_bytes: int, streams: int) -> str:
    """`current` (that generation, whatever is written meanwhile) into `tmp` in slices of at most
    slice_bytes (slice_length), at most `streams` at once. Returns the crc32c; durable when this
    returns. A slice that comes back short, or a whole whose crc32c is not the object's, is a
    transient StorageError (nothing is installed: the caller's temporary file is removed)."""
    size = current.size
    length = slice_length(size, streams, slice_bytes)
    spans = [(start, min(start + length, size) - 1) for start in range(0, size, length)]
    with open(tmp, "wb") as f:
        f.truncate(size)

    def fetch(span: tuple[int, int]) -> tuple[int, int]:
        start, end = span
        with open(tmp, "r+b") as f:
            f.seek(start)
            out = HashingWriter(f)
            read_range(current.name, current.generation, start, end, out)
        if out.written != end - start + 1:
            raise StorageError(f"{where}: bytes {start}-{end} came back as {out.written} bytes",
                               transient=True)
        return out.crc32c_int, out.written

    with ThreadPoolExecutor(max_workers=max(1, min(streams, len(spans))),
                            thread_name_prefix="neox-slice") as pool:
        parts = list(pool.map(fetch, spans))
    crc = 0
    for part_crc, length in parts:
        crc = crc32c_combine(crc, part_crc, length)
    got = crc32c_text(crc.to_bytes(4, "big"))
    if got != current.crc32c:
        raise StorageError(f"{where} came down with crc32c {got}, but the bucket reports "
                           f"{current.crc32c} for it", transient=True)
    with open(tmp, "r+b") as f:
        os.fsync(f.fileno())
    return got
