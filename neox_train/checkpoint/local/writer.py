"""Checkpoint files written near the disk's speed, hashed on the way and durable when closed.

`torch.save(obj, path)` goes through PyTorch's zip writer into the page cache. Measured on these VMs
it reached 0.27 of `dd oflag=direct` on the same folder: fresh page-cache memory is slow to touch
the first time, and every byte is copied once more by the kernel. Here torch.save serializes into a
`DirectFile` instead (torch calls its `write` with views of each tensor's storage, no copy). Each
view is copied once into a page-aligned chunk buffer that is reused for every file of every save.
Full chunks go to the disk in large O_DIRECT writes that bypass the page cache, on a second thread,
so the copy into one buffer overlaps the write of the other. The crc32c the marker needs is computed
from the same buffers, so the commit never reads the file back.

Filesystems that refuse O_DIRECT (tmpfs, some network mounts) get plain buffered writes of the same
chunks. Either way the file is fsynced before `close` returns.

`torch_save` is torch.save with its zip writer's per-record crc32 turned off. That crc (about 4 GB/s
on one core) is computed over each whole tensor before the first of its bytes reaches `write`, so
the disk waits: with ZeRO's flat 1.6 GB partitions it cost a third of the save (6.5 GB at ZeRO-2:
0.68 of dd with it, 1.09 without). torch.load never checks it; the file's crc32c in the completeness
marker is what the commit and the publication check. Python's `zipfile` does check it (Bad CRC-32):
read such a file with torch.load.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import google_crc32c
import google_crc32c._crc32c
import numpy as np
import torch

from neox_train.checkpoint.local.commit import FileRecord
from neox_train.remote.files import crc32c_text

# O_DIRECT wants buffer address, file offset and length aligned to the logical block size
ALIGN = 4096
# large enough that a write costs far more than its syscall; two of them per writer
CHUNK_BYTES = 32 << 20


def _crc32c_extend_function():
    """google-crc32c's C function, called through ctypes on a buffer's address: its Python wrapper
    accepts only `bytes` (a copy of every chunk, under the GIL), while a ctypes call reads the
    buffer in place with the GIL released. None where the C extension is missing (its pure-Python
    fallback): then chunks are copied."""
    try:
        # resolved from the library it links
        fn = ctypes.CDLL(google_crc32c._crc32c.__file__).crc32c_extend
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_CRC32C_EXTEND = _crc32c_extend_function()


class ChunkBuffers:
    """Two page-aligned chunk buffers (anonymous mmap: aligned, and touched once, then reused by
    every file)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self.maps = [mmap.mmap(-1, chunk_bytes) for _ in range(2)]
        self.arrays = [np.frombuffer(m, dtype=np.uint8) for m in self.maps]
        self.addresses = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.maps]

    def crc32c(self, crc: int, index: int, length: int) -> int:
        """crc32c extended by the first `length` bytes of buffer `index`."""
        if _CRC32C_EXTEND is not None:
            return _CRC32C_EXTEND(crc, self.addresses[index], length)
        return google_crc32c.extend(crc, bytes(self.maps[index][:length]))


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


class DirectFile:
    """A write-only binary file for torch.save: chunked, O_DIRECT where the filesystem allows,
    crc32c on the fly.

    The second buffer is written by a short-lived thread while the next one fills: os.write releases
    the GIL, and so does the numpy copy, so the training thread keeps running."""

    def __init__(self, path: Path, buffers: ChunkBuffers, *, direct: bool = True):
        self.path = Path(path)
        self.buffers = buffers
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if not self.direct:
            self.fd = os.open(self.path, flags, 0o644)
        self.crc = 0
        self.size = 0
        self.current = 0  # which buffer fills
        self.fill = 0
        self._written = 0  # bytes on disk so far (padding included)
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the file protocol torch.save uses ---------------------------------------------------------
    def write(self, data) -> int:
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        n = len(src)
        pos = 0
        chunk = self.buffers.chunk_bytes
        while pos < n:
            take = min(n - pos, chunk - self.fill)
            self.buffers.arrays[self.current][self.fill:self.fill + take] = src[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == chunk:
                self._hand_off()
        self.size += n
        return n

    def flush(self) -> None:
        pass  # the data goes out in whole chunks; close() writes the rest

    def writable(self) -> bool:
        return True

    # -- chunks ------------------------------------------------------------------------------------
    def _hand_off(self, *, last: bool = False) -> None:
        """Hash the full buffer, wait for the previous write, start this one, switch buffers."""
        index, length = self.current, self.fill
        self.crc = self.buffers.crc32c(self.crc, index, length)
        self._wait()
        padded = length
        if self.direct and length % ALIGN:
            # the tail block: zero padding, truncated away in close()
            padded = length + ALIGN - length % ALIGN
            self.buffers.arrays[index][length:padded] = 0
        out = memoryview(self.buffers.maps[index])[:padded]
        if last:
            self._write_out(out)
        else:
            self._pending = threading.Thread(target=self._write_chunk, args=(out,),
                                             name="neox-ckpt-write", daemon=True)
            self._pending.start()
        self.current = 1 - index
        self.fill = 0

    def _write_out(self, view: memoryview) -> None:
        try:
            _write_all(self.fd, view)
        except OSError as e:
            # Some filesystems accept O_DIRECT at open and refuse the writes: start over buffered
            # (only the first chunk can meet this, so nothing is lost; the padding is truncated in
            # close()).
            if not (self.direct and e.errno == errno.EINVAL and self._written == 0):
                raise
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.direct = False
            _write_all(self.fd, view)
        self._written += len(view)

    def _write_chunk(self, view: memoryview) -> None:
        try:
            self._write_out(view)
        except BaseException as e:  # noqa: BLE001 - re-raised in the writing thread by _wait
            self._error = e

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> FileRecord:
        """Write the rest, fsync, close; the file's size, crc32c and mtime (what the completeness
        marker holds)."""
        try:
            if self.fill:
                self._hand_off(last=True)
            self._wait()
            if self._written != self.size:  # the zero padding of the last O_DIRECT block
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
            st = os.fstat(self.fd)
        finally:
            self.abort()
        return FileRecord(size=st.st_size, crc32c=crc32c_text(self.crc.to_bytes(4, "big")),
                          mtime_ns=st.st_mtime_ns)

    def abort(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ZIP_CRC32_LOCK = threading.Lock()


def torch_save(obj: Any, out: DirectFile, *, zipfile_serialization: bool = True) -> None:
    """torch.save(obj, out) without the zip records' crc32 (see the module docstring); the same
    bytes otherwise. The switch is torch's, process-wide and read when the zip writer is created:
    it is set under a lock for this call only and restored after."""
    with _ZIP_CRC32_LOCK:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(obj, out, _use_new_zipfile_serialization=zipfile_serialization)
        finally:
            torch.serialization.set_crc32_options(before)
