"""Where checkpoints and data live remotely: one small Backend interface over a gs:// bucket prefix
or a local folder.

Both backends speak the same language: names relative to the backend root, '/'-separated, and an
object's identity is (size, crc32c) in the base64 big-endian form GCS reports, so a local folder can
stand in for a bucket in tests, on a shared filesystem, and for `neox-sync` between two folders.
Transfers, retries and checksums are the google-cloud-storage client's own (resumable uploads,
`google.api_core.retry`, crc32c validation); this module only chooses their settings and turns their
many exception types into one-line StorageErrors.

Thread safety: a backend may be shared by the threads of one process (google-cloud-storage's own
transfer_manager does the same with one client). It must not cross a fork: open a new backend in the
child.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from neox_train.errors import StorageError

PROBE_PREFIX = ".neox-probe-"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_URL_FORMS = "gs://BUCKET[/PREFIX], file:///ABS/PATH or a local path"


class RemoteChanged(StorageError):
    """An object was not at the generation a conditional write expected (someone else wrote or
    removed it in the meantime). Nothing was overwritten; a new attempt reads the state again and
    decides again."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # relative to the backend root, '/'-separated
    size: int
    crc32c: str  # base64 of the big-endian CRC32C, exactly as GCS reports blob.crc32c
    # GCS's object generation (a new one at every write); the local backend's mtime_ns
    generation: int = 0


class Backend(Protocol):
    """A folder of objects. Every name is relative to the root in `url` and '/'-separated, with no
    leading '/'.

    Every write is conditional (GCS generation preconditions): `generation=0` creates the object
    only if it does not exist, `generation=G` replaces it only if it is still at generation G. When
    the condition fails, an object that already holds exactly the new content counts as written (an
    earlier attempt of the same write landed and its response was lost); anything else raises
    RemoteChanged and changes nothing. `generation=None` writes unconditionally: for tests and
    tools, never used by neox-train's own commands."""

    url: str
    retries: int  # requests retried so far (transient errors); 0 for backends that never retry

    def list(self, prefix: str = "") -> dict[str, RemoteFile]:
        """Every object whose name starts with `prefix` (a string prefix, as in GCS: "a/" for a
        folder)."""
        ...

    def stat(self, name: str) -> RemoteFile | None:
        """One object's size, crc32c and generation, or None when it does not exist."""
        ...

    def upload_file(self, local: Path, name: str, *, crc32c: str | None,
                    generation: int | None) -> RemoteFile:
        """Copy a local file to `name` under the write condition `generation`; returns the stored
        object.

        `crc32c`: the file's checksum when already known (the upload is refused unless the stored
        object ends up with exactly it), or None to hash the bytes while sending them (one read of
        the file instead of two; the upload fails if what was stored differs from what was read, or
        if the file changed meanwhile)."""
        ...

    def download_file(self, name: str, local: Path, *, size: int | None = None) -> str:
        """Copy `name` to `local` atomically (temporary file + os.replace), creating parent
        folders; the file is durable (fsynced) when this returns. Returns the crc32c of the bytes
        written, hashed as they arrived (no second read of the file). `size`: the object's size
        where the caller knows it (a listing, a manifest), so a small file costs no metadata
        request."""
        ...

    def read_bytes(self, name: str) -> bytes | None:
        """The object's content, or None when it does not exist."""
        ...

    def read(self, name: str) -> tuple[bytes, int] | None:
        """The object's content and the generation it belongs to (for a conditional write after it),
        or None."""
        ...

    def write_bytes(self, name: str, data: bytes, *, generation: int | None) -> RemoteFile:
        """Store a small object under the write condition `generation` (as upload_file)."""
        ...

    def delete(self, name: str, *, generation: int | None) -> None:
        """Remove an object; an absent one is fine. With a generation, only if it is still that
        generation."""
        ...

    def probe(self) -> None:
        """Prove credentials, bucket and write permission by writing and deleting
        `.neox-probe-<uuid>`."""
        ...


def settle(existing: RemoteFile | None, where: str, size: int, crc32c: str,
           generation: int | None, what: str) -> RemoteFile:
    """412 on a conditional write: the object was not at `generation`, and `existing` is what is
    there now. Success only if it holds exactly this content (an earlier attempt of this very write
    landed and its response was lost); anything else is RemoteChanged."""
    if existing is not None and (existing.size, existing.crc32c) == (size, crc32c):
        return existing
    if existing is None:
        raise RemoteChanged(f"{where}: conditional write refused and the object is gone; retry")
    if generation == 0:
        raise RemoteChanged(
            f"{where} already exists with different content (size {existing.size}, crc32c "
            f"{existing.crc32c}; {what}: size {size}, crc32c {crc32c}); refusing to overwrite it")
    raise RemoteChanged(f"{where} changed remotely (generation {existing.generation}, expected "
                        f"{generation}); refusing to overwrite it")


# Every retried request in this process, whichever backend made it: the sync/retries metric adds the
# upload worker's count to this one (start-up probe, ownership checks).
_RETRIES_LOCK = threading.Lock()
_process_retries = 0


def process_retries() -> int:
    return _process_retries


def note_retry() -> None:
    """One more retried request in this process (the GCS backend's retry policy calls it)."""
    global _process_retries
    with _RETRIES_LOCK:
        _process_retries += 1


def parse_url(url: str) -> tuple[str, str, str]:
    """("gs", bucket, prefix) for gs://bucket/prefix, ("file", absolute path, "") for file:///path
    or a plain path.

    The prefix loses surrounding '/'; a prefix with empty parts ("a//b") is refused, since GCS would
    keep the double slash in every name while the local layout cannot.
    """
    if not url:
        raise StorageError(f"empty storage URL (valid: {_URL_FORMS})")
    if url.startswith("gs://"):
        bucket, _, prefix = url[len("gs://"):].partition("/")
        if not _BUCKET_RE.match(bucket):
            raise StorageError(
                f"{url}: {bucket!r} is not a valid bucket name (3-222 characters of a-z, 0-9, '.', "
                f"'-', '_', starting and ending with a letter or digit)"
            )
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise StorageError(f"{url}: the prefix {prefix!r} has empty, '.' or '..' parts (valid: "
                               f"gs://{bucket}/a/b)")
        return "gs", bucket, prefix
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(
                f"{url}: file URLs name a local path, not host {parsed.netloc!r} (valid: "
                "file:///abs/path)")
        return "file", str(Path(unquote(parsed.path)).resolve()), ""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if scheme:
        raise StorageError(
            f"{url}: unsupported URL scheme {scheme.group(1)!r} (valid: {_URL_FORMS})")
    return "file", str(Path(url).expanduser().resolve()), ""
