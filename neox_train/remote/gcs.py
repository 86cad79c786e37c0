"""A gs://bucket/prefix through google-cloud-storage: its transfers, retries and checksums are the
library's; this module chooses their settings, holds the stream budget (one semaphore that every
request moving an object's bytes takes), and supplies the primitives of parallel uploads
(composite.py) and sliced downloads (sliced.py)."""

from __future__ import annotations

import base64
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import google.cloud.storage.blob as blob_module
from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud.storage.exceptions import DataCorruption

from neox_train.config import DEFAULT_TRANSFER_STREAMS
from neox_train.errors import StorageError, one_line
from neox_train.remote.base import PROBE_PREFIX, RemoteChanged, RemoteFile, settle
from neox_train.remote.composite import (
    PART_CHUNK_BYTES,
    FileRange,
    ParallelUploads,
    PartsJournal,
    default_journal_path,
    is_part,
    refuses_parts,
)
from neox_train.remote.files import (
    TMP_MARK,
    HashingWriter,
    changed_since,
    crc32c_of_bytes,
    crc32c_of_file,
    stat_key,
)
from neox_train.remote.gcs_auth import make_client
from neox_train.remote.gcs_errors import Failures, is_refusal, mapped_errors, retry_policy
from neox_train.remote.sliced import SLICE_BYTES, SLICED_MIN_BYTES, download_sliced, sliceable

# Files over 8 MiB (the client's multipart limit) go as resumable uploads in chunks of this size (a
# multiple of 256 KiB, as GCS requires); each chunk is retried on its own, so a failure late in a
# multi-GB file resends one chunk, not the file. Memory cost: one chunk per upload thread.
CHUNK_SIZE = 100 * 1024 * 1024  # the client library's own default: fewer round trips per file


def _multipart_limit() -> int:
    """Up to this size google-cloud-storage sends one multipart request, above it a resumable upload
    (its module constant, read at call time so it stays the library's truth)."""

    return int(getattr(blob_module, "_MAX_MULTIPART_SIZE", 8 * 1024 * 1024))


# an operation keeps retrying transient errors (503, reset, timeout) this long
RETRY_DEADLINE_S = 600.0


# the start-up probe gives up sooner: a wrong host should fail fast, not after 10 min
PROBE_DEADLINE_S = 30.0


# (connect, read) per HTTP request, before the retry policy decides
REQUEST_TIMEOUT_S = (30.0, 120.0)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class GcsBackend:
    """A gs://bucket/prefix through google-cloud-storage. Retries are the library's (DEFAULT_RETRY's
    predicate: 429/5xx, resets, timeouts) with an explicit deadline, passed to every call, uploads
    included: the library only retries an upload by itself when it carries a generation
    precondition, and an overwrite carries none (it is still safe to repeat: same bytes, same
    result)."""

    def __init__(self, bucket: str, prefix: str = "", *, credentials: str | None = None,
                 client=None, streams: int = DEFAULT_TRANSFER_STREAMS, parallel: bool = True,
                 parts_journal: Path | None = None):
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.client = client if client is not None else make_client(self.url, credentials)
        self.bucket = self.client.bucket(bucket)
        self.chunk_size = CHUNK_SIZE
        self.timeout = REQUEST_TIMEOUT_S
        self.failures = Failures()
        self.slice_bytes, self.sliced_min_bytes = SLICE_BYTES, SLICED_MIN_BYTES
        # every request that moves an object's bytes holds one of these: the stream budget
        self.streams = streams
        self._streams = threading.BoundedSemaphore(streams)
        # one line for the user: stderr here; the upload process sends it to the trainer's log
        self.warn = lambda message: print(f"WARNING: {message}", file=sys.stderr, flush=True)
        self.parallel = ParallelUploads(self, PartsJournal(parts_journal or default_journal_path()))
        if not parallel:
            self.parallel.disabled = "parallel uploads are off (parallel_uploads: false)"
        self.configure_retry()

    def configure_retry(self, *, deadline_s: float = RETRY_DEADLINE_S,
                        probe_deadline_s: float = PROBE_DEADLINE_S, initial_s: float = 1.0,
                        maximum_s: float = 60.0) -> None:
        """The retry policy (gcs_errors.retry_policy) until deadline_s, and until probe_deadline_s
        for the start-up probe. Tests shorten it; production keeps the library's backoff."""
        self.deadline_s, self.probe_deadline_s = deadline_s, probe_deadline_s
        self.retry, self.probe_retry = (
            retry_policy(d, initial_s=initial_s, maximum_s=maximum_s,
                         on_error=self.failures.retried) for d in (deadline_s, probe_deadline_s))

    @property
    def retries(self) -> int:
        return self.failures.count

    def failing_for(self) -> tuple[float, str]:
        return self.failures.failing_for()

    @property
    def host(self) -> str:
        return urlparse(self.client.api_endpoint).netloc or "storage.googleapis.com"

    def _name(self, name: str) -> str:
        full = _join(self.prefix, name)
        if not full or name.startswith("/"):
            raise StorageError(
                f"{self.url}: object name {name!r} is empty or absolute (valid: a/b relative to "
                "the root)")
        return full

    def _where(self, name: str | None) -> str:
        return f"{self.url}/{name}" if name else self.url

    @contextmanager
    def _errors(self, action: str, name: str | None = None, *, missing: str = "bucket",
                deadline_s: float | None = None) -> Iterator[None]:
        """gcs_errors.mapped_errors for this backend, and the note that a request got through."""
        with mapped_errors(action, self._where(name), host=self.host, bucket=self.bucket_name,
                           deadline_s=deadline_s or self.deadline_s, missing=missing):
            yield
        self.failures.got_through()

    def _remote(self, name: str, blob) -> RemoteFile:
        return RemoteFile(name, int(blob.size or 0), blob.crc32c or "", int(blob.generation or 0))

    def _listing(self, prefix: str, fields: str) -> Iterator[tuple[str, object]]:
        root = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list", prefix or None):
            for blob in self.client.list_blobs(self.bucket_name, prefix=root + prefix,
                                               retry=self.retry, timeout=self.timeout,
                                               fields=f"items({fields}),nextPageToken"):
                yield blob.name[len(root):], blob

    def list(self, prefix: str = "") -> dict[str, RemoteFile]:
        # parts of an upload in progress (composite.PARTS_DIR) are nobody's files
        return {rel: self._remote(rel, blob) for rel, blob in
                self._listing(prefix, "name,size,crc32c,generation") if not is_part(rel)}

    def list_parts(self, prefix: str) -> list[str]:
        """Names under `prefix` (inside composite.PARTS_DIR), which list() leaves out."""
        return [rel for rel, _blob in self._listing(prefix, "name")]

    def stat(self, name: str) -> RemoteFile | None:
        with self._errors("read", name):
            blob = self.bucket.get_blob(self._name(name), retry=self.retry, timeout=self.timeout)
        return None if blob is None else self._remote(name, blob)

    def upload_file(self, local: Path, name: str, *, crc32c: str | None,
                    generation: int | None) -> RemoteFile:
        local = Path(local)
        try:
            before = stat_key(local)
        except OSError as e:
            raise StorageError(
                f"cannot upload {local} to {self._where(name)}: {one_line(e)}") from e
        self.parallel.sweep()  # parts an earlier process left behind go first
        try:
            return self.parallel.upload(
                local, name, size=before[0], crc32c=crc32c, generation=generation,
                unchanged=lambda: not changed_since(local, before)
            ) or self._upload_one_stream(local, name, crc32c, generation, before)
        except OSError as e:  # the local file vanished or is unreadable
            raise StorageError(
                f"cannot upload {local} to {self._where(name)}: {one_line(e)}") from e

    def _upload_one_stream(self, local: Path, name: str, crc32c: str | None,
                           generation: int | None, before: tuple[int, int]) -> RemoteFile:
        size = before[0]
        blob = self.bucket.blob(self._name(name))
        # Above 8 MiB the library switches to a resumable upload, sent in chunks of this size.
        blob.chunk_size = self.chunk_size
        resumable = size > _multipart_limit()
        try:
            with self._streams, self._errors("write", name):
                blob.upload_from_filename(
                    str(local), if_generation_match=generation, retry=self.retry,
                    timeout=self.timeout,
                    # A known crc32c is declared up front on a resumable upload, so GCS itself
                    # refuses an object with other content and the client need not hash the file
                    # again while sending it. Otherwise (not hashed yet, or a multipart upload,
                    # which has no such field) the client hashes what it sends and fails unless the
                    # stored object's crc32c is the same.
                    checksum=None if crc32c is not None and resumable else "crc32c",
                    crc32c_checksum_value=crc32c if resumable else None,
                )
        except PreconditionFailed:
            if crc32c is None:
                crc32c = crc32c_of_file(local)
            return self._settle(name, size, crc32c, generation, str(local))
        except StorageError as e:
            if isinstance(e.__cause__, DataCorruption):
                # The object landed with bytes other than those read: remove that generation (ours),
                # or every retry would meet a refusal ("different content") instead of uploading
                # again.
                self._delete_quietly(name, blob.generation)
            raise
        changed = changed_since(local, before)
        if changed or (crc32c is not None and blob.crc32c != crc32c) or int(blob.size or 0) != size:
            self._delete_quietly(name, blob.generation)
            if changed:
                raise StorageError(f"{local} changed while it was uploaded to {self._where(name)}; "
                                   f"the upload was discarded", transient=True)
            raise StorageError(
                f"{self._where(name)} was stored with size {blob.size} crc32c {blob.crc32c}, but "
                f"{local} was hashed as size {size} crc32c {crc32c}: the local file changed during "
                "the upload", transient=True)
        return self._remote(name, blob)

    # -- the composite path's primitives (composite.ParallelUploads drives them)

    def put_part(self, part: str, local: Path, offset: int, length: int) -> int:
        """Bytes offset..offset+length of `local` as the object `part`, on one stream; the client
        hashes what it sends and fails unless the stored crc32c is the same. Returns that crc32c.
        Unconditional: the name is this upload's own (a retry that finds its earlier attempt landed
        rewrites the same bytes)."""
        blob = self.bucket.blob(self._name(part))
        blob.chunk_size = PART_CHUNK_BYTES
        with (self._streams, self._errors("write", part), FileRange(local, offset, length) as f):
            blob.upload_from_file(f, size=None, checksum="crc32c", retry=self.retry,
                                  timeout=self.timeout)
        return int.from_bytes(base64.b64decode(blob.crc32c), "big")

    def compose_parts(self, parts: list[str], name: str, *, generation: int | None, size: int,
                      crc32c: str) -> RemoteFile:
        """The parts, in order, as `name` under the write condition `generation`; refused unless
        the bucket's crc32c of the result is `crc32c` (the file's, combined from the parts')."""
        blob = self.bucket.blob(self._name(name))
        try:
            with self._errors("write", name):
                blob.compose([self.bucket.blob(self._name(p)) for p in parts],
                             if_generation_match=generation, retry=self.retry,
                             timeout=self.timeout)
        except PreconditionFailed:
            return self._settle(name, size, crc32c, generation, "the composed parts")
        if blob.crc32c != crc32c or int(blob.size or 0) != size:
            self._delete_quietly(name, blob.generation)
            raise StorageError(
                f"{self._where(name)} was composed with size {blob.size} crc32c {blob.crc32c}, "
                f"but its parts add up to size {size} crc32c {crc32c}; discarded", transient=True)
        return self._remote(name, blob)

    def bucket_refusal(self) -> str:
        """Why this bucket should get no parts (composite.refuses_parts), or "" (also when its
        settings cannot be read: objectAdmin alone may not read bucket metadata)."""
        try:
            with self._errors("read the settings of", None):
                self.bucket.reload(retry=self.retry, timeout=self.timeout)
        except StorageError:
            return ""
        return refuses_parts(self.bucket.retention_period, self.bucket.default_event_based_hold,
                             self.bucket.storage_class)

    @staticmethod
    def refused(error: StorageError) -> bool:
        return is_refusal(error)

    def _delete_quietly(self, name: str, generation) -> None:
        """Remove the object generation this process just wrote (and only that one: a later writer's
        object stays)."""
        if not generation:
            return
        try:
            self.delete(name, generation=int(generation))
        except StorageError:
            pass  # best effort: the next conditional write names the leftover if it is still there

    def _settle(self, name: str, size: int, crc32c: str, generation: int | None,
                what: str) -> RemoteFile:
        return settle(self.stat(name), self._where(name), size, crc32c, generation, what)

    def download_file(self, name: str, local: Path, *, size: int | None = None) -> str:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{TMP_MARK}{uuid.uuid4().hex}")
        try:
            current = self._sliceable(name) if self.streams > 1 and (
                size is None or size >= self.sliced_min_bytes) else None
            if current is not None:
                crc32c = download_sliced(
                    self._read_range, current, tmp, where=self._where(name),
                    slice_bytes=self.slice_bytes, streams=self.streams)
                os.replace(tmp, local)
                return crc32c
            with (self._streams, self._errors("read", name, missing="object"),
                  open(tmp, "wb") as f):
                # The client checks the object's crc32c as it reads (and resumes an interrupted
                # read where it stopped); the writer hashes the same bytes for the caller.
                out = HashingWriter(f)
                self.bucket.blob(self._name(name)).download_to_file(
                    out, checksum="crc32c", retry=self.retry, timeout=self.timeout)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
            return out.crc32c
        finally:
            tmp.unlink(missing_ok=True)

    def _sliceable(self, name: str) -> RemoteFile | None:
        """The object, when it comes down in slices (sliced.py says which)."""
        with self._errors("read", name):
            blob = self.bucket.get_blob(self._name(name), retry=self.retry, timeout=self.timeout)
        if blob is None or not sliceable(int(blob.size or 0), blob.crc32c, blob.content_encoding,
                                         self.sliced_min_bytes):
            return None
        return self._remote(name, blob)

    def _read_range(self, name: str, generation: int, start: int, end: int,
                    out: HashingWriter) -> None:
        """Bytes start..end of that generation of `name` into `out`: one slice, one stream."""
        blob = self.bucket.blob(self._name(name), generation=generation)
        with self._streams, self._errors("read", name, missing="object"):
            blob.download_to_file(out, start=start, end=end, checksum=None, retry=self.retry,
                                  timeout=self.timeout)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            with self._errors("read", name):
                return self.bucket.blob(self._name(name)).download_as_bytes(
                    checksum="crc32c", retry=self.retry, timeout=self.timeout)
        except StorageError as e:
            if isinstance(e.__cause__, NotFound):
                return None
            raise

    def read(self, name: str) -> tuple[bytes, int] | None:
        # the object may be replaced between the two requests: read that generation or again
        for _ in range(5):
            current = self.stat(name)
            if current is None:
                return None
            try:
                with self._errors("read", name):
                    data = self.bucket.blob(self._name(name)).download_as_bytes(
                        if_generation_match=current.generation, checksum="crc32c", retry=self.retry,
                        timeout=self.timeout)
                return data, current.generation
            except PreconditionFailed:
                continue
            except StorageError as e:
                if isinstance(e.__cause__, NotFound):
                    return None
                raise
        raise RemoteChanged(f"{self._where(name)} kept changing while it was read; retry")

    def write_bytes(self, name: str, data: bytes, *, generation: int | None) -> RemoteFile:
        blob = self.bucket.blob(self._name(name))
        try:
            with self._errors("write", name):
                blob.upload_from_string(data, checksum="crc32c", if_generation_match=generation,
                                        retry=self.retry, timeout=self.timeout)
        except PreconditionFailed:
            return self._settle(name, len(data), crc32c_of_bytes(data), generation, "new content")
        return self._remote(name, blob)

    def delete(self, name: str, *, generation: int | None) -> None:
        try:
            with self._errors("delete", name):
                self.bucket.blob(self._name(name)).delete(if_generation_match=generation,
                                                          retry=self.retry, timeout=self.timeout)
        except PreconditionFailed:
            raise RemoteChanged(
                f"{self._where(name)} changed remotely (not generation {generation}); not deleted")
        except StorageError as e:
            if not isinstance(e.__cause__, NotFound):
                raise

    def probe(self) -> None:
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        blob = self.bucket.blob(self._name(name))
        with self._errors("write", None, deadline_s=self.probe_deadline_s):
            blob.upload_from_string(b"probe", if_generation_match=0, retry=self.probe_retry,
                                    timeout=self.timeout)
            blob.delete(if_generation_match=blob.generation, retry=self.probe_retry,
                        timeout=self.timeout)
