"""A local folder with a bucket's semantics: atomic writes, generations, conditional writes under a
folder lock."""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from neox_train.errors import StorageError, one_line
from neox_train.remote.base import PROBE_PREFIX, RemoteChanged, RemoteFile, settle
from neox_train.remote.files import (
    READ_CHUNK,
    TMP_MARK,
    Crc32cCache,
    HashingWriter,
    changed_since,
    crc32c_of_bytes,
    stat_key,
)


class LocalBackend:
    """A local folder with the bucket's semantics (a missing folder is an empty bucket): atomic
    writes (temporary file + os.replace), crc32c computed on listing (cached by size and mtime), and
    generations: a file's st_mtime_ns, which every write (a new file renamed into place) changes.
    Conditional writes and deletes take an exclusive lock on the folder (flock on the folder itself,
    so between processes too) around the check and the rename."""

    def __init__(self, root: Path, *, cache: Crc32cCache | None = None):
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self.retries = 0
        self._cache = cache if cache is not None else Crc32cCache()
        self._thread_lock = threading.Lock()

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name
                or any(p in ("", ".", "..") for p in parts)):
            raise StorageError(
                f"{self.url}: object name {name!r} would escape the folder or is not a plain "
                "relative name")
        return self.root.joinpath(*parts)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            # flock on the folder itself: no lock file among the objects
            fd = os.open(self.root, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _remote(self, name: str, path: Path) -> RemoteFile:
        st = path.stat()
        return RemoteFile(name, st.st_size, self._cache.get(path), st.st_mtime_ns)

    def list(self, prefix: str = "") -> dict[str, RemoteFile]:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.url} is not a folder")
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        out: dict[str, RemoteFile] = {}
        if not start.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for fn in sorted(filenames):
                if TMP_MARK in fn:
                    continue
                path = Path(dirpath, fn)
                rel = path.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    try:
                        out[rel] = self._remote(rel, path)
                    except FileNotFoundError:
                        continue  # deleted while listing
        return out

    def stat(self, name: str) -> RemoteFile | None:
        path = self._path(name)
        try:
            return self._remote(name, path) if path.is_file() else None
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {self.url}/{name}: {one_line(e)}") from e

    def _copy_in(self, src: Path, dest: Path, expect_crc32c: str | None) -> tuple[Path, str]:
        """Copy src to a temporary file next to dest, hashing on the way; returns the temporary file
        and its crc32c."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}{TMP_MARK}{uuid.uuid4().hex}")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            out = HashingWriter(fout)
            while chunk := fin.read(READ_CHUNK):
                out.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        got = out.crc32c
        if expect_crc32c is not None and got != expect_crc32c:
            tmp.unlink(missing_ok=True)
            raise StorageError(
                f"{src} has crc32c {got}, not {expect_crc32c} as hashed before: it changed during "
                "the copy",
                transient=True)
        return tmp, got

    def _place(self, tmp: Path, dest: Path, name: str, generation: int | None, crc32c: str,
               what: str) -> RemoteFile:
        """Rename tmp to dest if dest is at `generation` (0: absent); else success only for
        identical content."""
        try:
            with self._locked():
                if generation is not None:
                    current = self.stat(name)
                    if (0 if current is None else current.generation) != generation:
                        return settle(current, f"{self.url}/{name}", tmp.stat().st_size, crc32c,
                                      generation, what)
                os.replace(tmp, dest)
                return self._remote(name, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, local: Path, name: str, *, crc32c: str | None,
                    generation: int | None) -> RemoteFile:
        dest = self._path(name)
        try:
            before = stat_key(Path(local))
            tmp, got = self._copy_in(Path(local), dest, crc32c)
            if changed_since(Path(local), before):
                tmp.unlink(missing_ok=True)
                raise StorageError(f"cannot copy {local} to {self.url}/{name}: the local file "
                                   "changed during the copy",
                                   transient=True)
            return self._place(tmp, dest, name, generation, got, str(local))
        except OSError as e:
            raise StorageError(f"cannot copy {local} to {self.url}/{name}: {one_line(e)}") from e

    def download_file(self, name: str, local: Path, *, size: int | None = None) -> str:
        src = self._path(name)
        local = Path(local)
        try:
            tmp, crc32c = self._copy_in(src, local, None)
            try:
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
            return crc32c
        except FileNotFoundError as e:
            if not src.is_file():
                raise StorageError(
                    f"cannot read {self.url}/{name}: the object does not exist") from e
            raise StorageError(f"cannot copy {self.url}/{name} to {local}: {one_line(e)}") from e
        except OSError as e:
            raise StorageError(f"cannot copy {self.url}/{name} to {local}: {one_line(e)}") from e

    def read_bytes(self, name: str) -> bytes | None:
        got = self.read(name)
        return None if got is None else got[0]

    def read(self, name: str) -> tuple[bytes, int] | None:
        try:
            # the generation of the very file read (renames replace it)
            with open(self._path(name), "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"cannot read {self.url}/{name}: {one_line(e)}") from e

    def write_bytes(self, name: str, data: bytes, *, generation: int | None) -> RemoteFile:
        dest = self._path(name)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{dest.name}{TMP_MARK}{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            return self._place(tmp, dest, name, generation, crc32c_of_bytes(data), "new content")
        except OSError as e:
            raise StorageError(f"cannot write {self.url}/{name}: {one_line(e)}") from e

    def delete(self, name: str, *, generation: int | None) -> None:
        path = self._path(name)
        try:
            with self._locked():
                if generation is not None:
                    current = self.stat(name)
                    if current is None:
                        return
                    if current.generation != generation:
                        raise RemoteChanged(f"{self.url}/{name} changed remotely (not generation "
                                            f"{generation}); not deleted")
                path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {self.url}/{name}: {one_line(e)}") from e
        # A bucket has no folders: drop the ones this left empty, so listings and `ls` agree.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def probe(self) -> None:
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / name
            path.write_bytes(b"probe")
            path.unlink()
        except PermissionError as e:
            raise StorageError(f"no permission to write {self.url}: {one_line(e)}") from e
        except OSError as e:
            raise StorageError(
                f"cannot write {self.url} (must be a writable folder): {one_line(e)}") from e
