"""Where checkpoints and data live remotely: one small Backend interface over a gs:// bucket prefix or a local folder.

Both backends speak the same language: names relative to the backend root, '/'-separated, and an object's identity
is (size, crc32c) in the base64 big-endian form GCS reports, so a local folder can stand in for a bucket in tests,
on a shared filesystem, and for `neox-sync` between two folders. Transfers, retries and checksums are the
google-cloud-storage client's own (resumable uploads, `google.api_core.retry`, crc32c validation); this module only
chooses their settings and turns their many exception types into one-line StorageErrors.

Thread safety: a backend may be shared by the threads of one process (google-cloud-storage's own transfer_manager
does the same with one client). It must not cross a fork: open a new backend in the child.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import google_crc32c

from neox_train.errors import StorageError, one_line

# Files over 8 MiB (the client's multipart limit) go as resumable uploads in chunks of this size (a multiple of
# 256 KiB, as GCS requires); each chunk is retried on its own, so a failure late in a multi-GB file resends one
# chunk, not the file. Memory cost: one chunk per upload thread.
CHUNK_SIZE = 100 * 1024 * 1024  # the client library's own default: fewer round trips per file


def _multipart_limit() -> int:
    """Up to this size google-cloud-storage sends one multipart request, above it a resumable upload (its module
    constant, read at call time so it stays the library's truth)."""
    import google.cloud.storage.blob as blob_module

    return int(getattr(blob_module, "_MAX_MULTIPART_SIZE", 8 * 1024 * 1024))
RETRY_DEADLINE_S = 600.0  # an operation keeps retrying transient errors (503, reset, timeout) this long
PROBE_DEADLINE_S = 30.0  # the start-up probe gives up sooner: a wrong host should fail fast, not after 10 min
REQUEST_TIMEOUT_S = (30.0, 120.0)  # (connect, read) per HTTP request, before the retry policy decides
PROBE_PREFIX = ".neox-probe-"
TMP_MARK = ".neox-tmp-"  # temporary files (atomic writes of the local backend, of local commits); never listed
_READ_CHUNK = 1024 * 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_URL_FORMS = "gs://BUCKET[/PREFIX], file:///ABS/PATH or a local path"


class RemoteChanged(StorageError):
    """An object was not at the generation a conditional write expected (someone else wrote or removed it in the
    meantime). Nothing was overwritten; a new attempt reads the state again and decides again."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # relative to the backend root, '/'-separated
    size: int
    crc32c: str  # base64 of the big-endian CRC32C, exactly as GCS reports blob.crc32c
    generation: int = 0  # GCS's object generation (a new one at every write); the local backend's mtime_ns


class Backend(Protocol):
    """A folder of objects. Every name is relative to the root in `url` and '/'-separated, with no leading '/'.

    Every write is conditional (GCS generation preconditions): `generation=0` creates the object only if it does
    not exist, `generation=G` replaces it only if it is still at generation G. When the condition fails, an object
    that already holds exactly the new content counts as written (an earlier attempt of the same write landed and
    its response was lost); anything else raises RemoteChanged and changes nothing. `generation=None` writes
    unconditionally: for tests and tools, never used by neox-train's own commands."""

    url: str
    retries: int  # requests retried so far (transient errors); 0 for backends that never retry

    def list(self, prefix: str = "") -> dict[str, RemoteFile]:
        """Every object whose name starts with `prefix` (a string prefix, as in GCS: "a/" for a folder)."""
        ...

    def stat(self, name: str) -> RemoteFile | None:
        """One object's size, crc32c and generation, or None when it does not exist."""
        ...

    def upload_file(self, local: Path, name: str, *, crc32c: str | None, generation: int | None) -> RemoteFile:
        """Copy a local file to `name` under the write condition `generation`; returns the stored object.

        `crc32c`: the file's checksum when already known (the upload is refused unless the stored object ends up
        with exactly it), or None to hash the bytes while sending them (one read of the file instead of two; the
        upload fails if what was stored differs from what was read, or if the file changed meanwhile)."""
        ...

    def download_file(self, name: str, local: Path) -> None:
        """Copy `name` to `local` atomically (temporary file + os.replace), creating parent folders."""
        ...

    def read_bytes(self, name: str) -> bytes | None:
        """The object's content, or None when it does not exist."""
        ...

    def read(self, name: str) -> tuple[bytes, int] | None:
        """The object's content and the generation it belongs to (for a conditional write after it), or None."""
        ...

    def write_bytes(self, name: str, data: bytes, *, generation: int | None) -> RemoteFile:
        """Store a small object under the write condition `generation` (as upload_file)."""
        ...

    def delete(self, name: str, *, generation: int | None) -> None:
        """Remove an object; an absent one is fine. With a generation, only if it is still that generation."""
        ...

    def probe(self) -> None:
        """Prove credentials, bucket and write permission by writing and deleting `.neox-probe-<uuid>`."""
        ...


# Every retried request in this process, whichever backend made it: the sync/retries metric adds the upload
# worker's count to this one (start-up probe, ownership checks).
_RETRIES_LOCK = threading.Lock()
_process_retries = 0


def process_retries() -> int:
    return _process_retries


def parse_url(url: str) -> tuple[str, str, str]:
    """("gs", bucket, prefix) for gs://bucket/prefix, ("file", absolute path, "") for file:///path or a plain path.

    The prefix loses surrounding '/'; a prefix with empty parts ("a//b") is refused, since GCS would keep the
    double slash in every name while the local layout cannot.
    """
    if not url:
        raise StorageError(f"empty storage URL (valid: {_URL_FORMS})")
    if url.startswith("gs://"):
        bucket, _, prefix = url[len("gs://"):].partition("/")
        if not _BUCKET_RE.match(bucket):
            raise StorageError(
                f"{url}: {bucket!r} is not a valid bucket name (3-222 characters of a-z, 0-9, '.', '-', '_', "
                f"starting and ending with a letter or digit)"
            )
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise StorageError(f"{url}: the prefix {prefix!r} has empty, '.' or '..' parts (valid: gs://{bucket}/a/b)")
        return "gs", bucket, prefix
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(
                f"{url}: file URLs name a local path, not host {parsed.netloc!r} (valid: file:///abs/path)")
        return "file", str(Path(unquote(parsed.path)).resolve()), ""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if scheme:
        raise StorageError(f"{url}: unsupported URL scheme {scheme.group(1)!r} (valid: {_URL_FORMS})")
    return "file", str(Path(url).expanduser().resolve()), ""


def open_backend(url: str, *, credentials: str | None = None, start_up: bool = False) -> Backend:
    """The backend for `url`. For gs:// this creates the client (credentials are checked now, the network is not
    touched: call probe() for that). `start_up`: for the checks before training starts, which give up after
    PROBE_DEADLINE_S instead of retrying for RETRY_DEADLINE_S (a bucket that cannot answer now fails the start in
    seconds, with one line)."""
    kind, where, prefix = parse_url(url)
    if kind == "gs":
        backend = GcsBackend(where, prefix, credentials=credentials)
        if start_up:
            backend.configure_retry(deadline_s=PROBE_DEADLINE_S)
        return backend
    return LocalBackend(Path(where))


def crc32c_of_file(path: Path) -> str:
    """The file's CRC32C as GCS reports it (base64 of the 4 big-endian bytes), read in 1 MiB chunks."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


def _stat_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _changed(path: Path, before: tuple[int, int]) -> bool:
    try:
        return _stat_key(path) != before
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
    """Replace `path` with `data` so that a reader (or a crash) sees the old content or the new, never a torn one,
    and the new content is on disk when this returns (temporary file, fsync, rename, fsync of the folder)."""
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
    """CRC32C per file, keyed by (absolute path, size, mtime_ns) and persisted as JSON, so that re-syncing an
    unchanged multi-GB checkpoint reads no file content (the rsync quick check; a rewrite changes mtime_ns).

    Thread-safe: the sync threads share one cache. `hits` / `misses` count lookups since construction.
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
                self._entries = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in raw["files"].items()}
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
        """The cached crc32c if the file is unchanged since it was hashed, else None; never reads the file."""
        path = Path(path).absolute()
        st = os.stat(path)
        with self._lock:
            entry = self._entries.get(str(path))
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        return None

    def put(self, path: Path | str, size_mtime: tuple[int, int], crc: str) -> None:
        """Record a crc32c computed elsewhere (while uploading) for the file as it was at `size_mtime`."""
        with self._lock:
            self._entries[str(Path(path).absolute())] = (size_mtime[0], size_mtime[1], crc)
            self._dirty = True

    def save(self) -> None:
        """Write the cache (atomically), dropping entries of files that no longer exist (deleted checkpoints)."""
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


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


# ----------------------------------------------------------------------------------------------------------------
# gs://


def _load_credentials(path: str):
    """Credentials from a JSON key file, checked now so that a typo fails before training starts, not at the first
    upload. Service-account keys, and gcloud's authorized-user files. Returns (credentials, project or None)."""
    from google.cloud import storage
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    file = Path(path).expanduser()
    if not file.is_file():
        raise StorageError(f"credentials file {path} does not exist (expected a service-account JSON key)")
    try:
        info = json.loads(file.read_text())
    except OSError as e:
        raise StorageError(f"credentials file {path} cannot be read ({one_line(e)})") from e
    except ValueError as e:
        raise StorageError(
            f"credentials file {path} is not JSON (expected a service-account JSON key): {one_line(e)}") from e
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            creds = service_account.Credentials.from_service_account_info(info, scopes=storage.Client.SCOPE)
            return creds, info.get("project_id")
        if kind == "authorized_user":
            return user_credentials.Credentials.from_authorized_user_info(info, scopes=storage.Client.SCOPE), None
    except (ValueError, KeyError) as e:
        raise StorageError(f"credentials file {path} is not a usable {kind} key: {one_line(e)}") from e
    raise StorageError(
        f"credentials file {path} has type {kind!r} (valid: service_account, or authorized_user from gcloud; "
        f"other kinds work through GOOGLE_APPLICATION_CREDENTIALS)"
    )


def _make_client(url: str, credentials: str | None):
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    if credentials:
        creds, project = _load_credentials(credentials)
    else:
        creds = project = None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator wants no token; real credentials would try to reach oauth2.googleapis.com.
        return storage.Client(project=project or os.environ.get("GOOGLE_CLOUD_PROJECT", "neox-emulator"),
                              credentials=AnonymousCredentials())
    if creds is None:
        import google.auth

        env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if env and not Path(env).expanduser().is_file():
            raise StorageError(f"credentials file {env} (from GOOGLE_APPLICATION_CREDENTIALS) does not exist")
        try:
            creds, project = google.auth.default(scopes=storage.Client.SCOPE)
        except DefaultCredentialsError as e:
            if env:
                raise StorageError(f"credentials file {env} (from GOOGLE_APPLICATION_CREDENTIALS) is not usable: "
                                   f"{one_line(e)}") from e
            raise StorageError(
                f"no Google Cloud credentials for {url}: pass --credentials FILE (a service-account JSON key), "
                f"set GOOGLE_APPLICATION_CREDENTIALS=FILE, or run `gcloud auth application-default login`"
            ) from e
    # project=None: object operations need none, and the client then skips looking one up.
    return storage.Client(project=project, credentials=creds)


class GcsBackend:
    """A gs://bucket/prefix through google-cloud-storage. Retries are the library's (DEFAULT_RETRY's predicate:
    429/5xx, resets, timeouts) with an explicit deadline, passed to every call, uploads included: the library only
    retries an upload by itself when it carries a generation precondition, and an overwrite carries none (it is
    still safe to repeat: same bytes, same result)."""

    def __init__(self, bucket: str, prefix: str = "", *, credentials: str | None = None, client=None):
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.client = client if client is not None else _make_client(self.url, credentials)
        self.bucket = self.client.bucket(bucket)
        self.chunk_size = CHUNK_SIZE
        self.timeout = REQUEST_TIMEOUT_S
        self.retries = 0
        self._retries_lock = threading.Lock()
        self.configure_retry()

    def configure_retry(self, *, deadline_s: float = RETRY_DEADLINE_S, probe_deadline_s: float = PROBE_DEADLINE_S,
                        initial_s: float = 1.0, maximum_s: float = 60.0) -> None:
        """The retry policy: DEFAULT_RETRY's predicate (429, 5xx, resets, timeouts) with exponential backoff from
        initial_s to maximum_s, until deadline_s. Tests shorten it; production keeps the library's backoff."""
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        def policy(deadline: float) -> Retry:
            return Retry(predicate=DEFAULT_RETRY._predicate, initial=initial_s, maximum=maximum_s, multiplier=2.0,
                         timeout=deadline, on_error=self._count_retry)

        self.deadline_s, self.probe_deadline_s = deadline_s, probe_deadline_s
        self.retry = policy(deadline_s)
        self.probe_retry = policy(probe_deadline_s)

    def _count_retry(self, _exc: BaseException) -> None:
        global _process_retries
        with self._retries_lock:
            self.retries += 1
        with _RETRIES_LOCK:
            _process_retries += 1

    @property
    def host(self) -> str:
        return urlparse(self.client.api_endpoint).netloc or "storage.googleapis.com"

    def _name(self, name: str) -> str:
        full = _join(self.prefix, name)
        if not full or name.startswith("/"):
            raise StorageError(
                f"{self.url}: object name {name!r} is empty or absolute (valid: a/b relative to the root)")
        return full

    def _where(self, name: str | None) -> str:
        return f"{self.url}/{name}" if name else self.url

    @contextmanager
    def _errors(self, action: str, name: str | None = None, *, missing: str = "bucket",
                deadline_s: float | None = None) -> Iterator[None]:
        """Map the client's exceptions to one-line StorageErrors, transient or permanent. `missing`: what a 404
        means for this call."""
        import requests
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        where = self._where(name)
        try:
            yield
        except (StorageError, api.PreconditionFailed):
            raise  # 412 is an answer for the caller of a conditional write, not an error
        except api.RetryError as e:
            cause = e.cause if e.cause is not None else e
            seconds = f"{deadline_s or self.deadline_s:.0f} s"
            if isinstance(cause, (requests.ConnectionError, requests.Timeout, ConnectionError)):
                raise StorageError(
                    f"cannot reach {self.host} to {action} {where} (gave up after {seconds}): {one_line(cause)}",
                    transient=True) from e
            raise StorageError(
                f"cannot {action} {where}: still failing after retrying for {seconds}: {one_line(cause)}",
                transient=True) from e
        except api.NotFound as e:
            if missing == "bucket":
                raise StorageError(
                    f"cannot {action} {where}: bucket {self.bucket_name} does not exist (create it, or fix the URL)"
                ) from e
            raise StorageError(f"cannot {action} {where}: the object does not exist") from e
        except api.Forbidden as e:
            raise StorageError(
                f"no permission to {action} {where} ({' '.join(str(e.message).split())}): the credentials need "
                f"e.g. roles/storage.objectAdmin on bucket {self.bucket_name}"
            ) from e
        except (api.Unauthorized, auth.RefreshError, auth.DefaultCredentialsError) as e:
            raise StorageError(f"credentials rejected while trying to {action} {where}: {one_line(e)}") from e
        except DataCorruption as e:
            raise StorageError(f"checksum mismatch while trying to {action} {where}: {one_line(e)}",
                               transient=True) from e
        except (requests.ConnectionError, requests.Timeout, ConnectionError, auth.TransportError) as e:
            raise StorageError(f"cannot reach {self.host} to {action} {where}: {one_line(e)}", transient=True) from e
        except api.GoogleAPICallError as e:
            code = int(e.code or 0)
            raise StorageError(f"cannot {action} {where}: HTTP {e.code} {' '.join(str(e.message).split())}",
                               transient=code >= 500 or code in (408, 429)) from e
        except InvalidResponse as e:
            raise StorageError(f"cannot {action} {where}: {one_line(e)}", transient=True) from e

    def _remote(self, name: str, blob) -> RemoteFile:
        return RemoteFile(name, int(blob.size or 0), blob.crc32c or "", int(blob.generation or 0))

    def list(self, prefix: str = "") -> dict[str, RemoteFile]:
        root = f"{self.prefix}/" if self.prefix else ""
        out: dict[str, RemoteFile] = {}
        with self._errors("list", prefix or None):
            for blob in self.client.list_blobs(self.bucket_name, prefix=root + prefix, retry=self.retry,
                                               timeout=self.timeout,
                                               fields="items(name,size,crc32c,generation),nextPageToken"):
                rel = blob.name[len(root):]
                out[rel] = self._remote(rel, blob)
        return out

    def stat(self, name: str) -> RemoteFile | None:
        with self._errors("read", name):
            blob = self.bucket.get_blob(self._name(name), retry=self.retry, timeout=self.timeout)
        return None if blob is None else self._remote(name, blob)

    def upload_file(self, local: Path, name: str, *, crc32c: str | None, generation: int | None) -> RemoteFile:
        from google.api_core.exceptions import PreconditionFailed

        local = Path(local)
        try:
            before = _stat_key(local)
        except OSError as e:
            raise StorageError(f"cannot upload {local} to {self._where(name)}: {one_line(e)}") from e
        size = before[0]
        blob = self.bucket.blob(self._name(name))
        # Above 8 MiB the library switches to a resumable upload, sent in chunks of this size.
        blob.chunk_size = self.chunk_size
        resumable = size > _multipart_limit()
        try:
            with self._errors("write", name):
                blob.upload_from_filename(
                    str(local), if_generation_match=generation, retry=self.retry, timeout=self.timeout,
                    # A known crc32c is declared up front on a resumable upload, so GCS itself refuses an object with
                    # other content and the client need not hash the file again while sending it. Otherwise (not
                    # hashed yet, or a multipart upload, which has no such field) the client hashes what it sends
                    # and fails unless the stored object's crc32c is the same.
                    checksum=None if crc32c is not None and resumable else "crc32c",
                    crc32c_checksum_value=crc32c if resumable else None,
                )
        except PreconditionFailed:
            if crc32c is None:
                crc32c = crc32c_of_file(local)
            return self._settle(name, size, crc32c, generation, str(local))
        except OSError as e:  # the local file vanished or is unreadable
            raise StorageError(f"cannot upload {local} to {self._where(name)}: {one_line(e)}") from e
        except StorageError as e:
            from google.cloud.storage.exceptions import DataCorruption

            if isinstance(e.__cause__, DataCorruption):
                # The object landed with bytes other than those read: remove that generation (ours), or every
                # retry would meet a refusal ("different content") instead of uploading again.
                self._delete_quietly(name, blob.generation)
            raise
        changed = _changed(local, before)
        if changed or (crc32c is not None and blob.crc32c != crc32c) or int(blob.size or 0) != size:
            self._delete_quietly(name, blob.generation)
            if changed:
                raise StorageError(f"{local} changed while it was uploaded to {self._where(name)}; the upload was "
                                   f"discarded", transient=True)
            raise StorageError(
                f"{self._where(name)} was stored with size {blob.size} crc32c {blob.crc32c}, but {local} was "
                f"hashed as size {size} crc32c {crc32c}: the local file changed during the upload", transient=True)
        return self._remote(name, blob)

    def _delete_quietly(self, name: str, generation) -> None:
        """Remove the object generation this process just wrote (and only that one: a later writer's object stays)."""
        if not generation:
            return
        try:
            self.delete(name, generation=int(generation))
        except StorageError:
            pass  # best effort: the next conditional write names the leftover if it is still there

    def _settle(self, name: str, size: int, crc32c: str, generation: int | None, what: str) -> RemoteFile:
        """412 on a conditional write: the object is not at `generation`. Success only if it now holds exactly this
        content (an earlier attempt of this very write landed and its response was lost)."""
        existing = self.stat(name)
        if existing is not None and (existing.size, existing.crc32c) == (size, crc32c):
            return existing
        if existing is None:
            raise RemoteChanged(f"{self._where(name)}: conditional write refused (412) and the object is gone; retry")
        if generation == 0:
            raise RemoteChanged(
                f"{self._where(name)} already exists with different content (size {existing.size}, crc32c "
                f"{existing.crc32c}; {what}: size {size}, crc32c {crc32c}); refusing to overwrite it")
        raise RemoteChanged(
            f"{self._where(name)} changed remotely (generation {existing.generation}, expected {generation}); "
            f"refusing to overwrite it")

    def download_file(self, name: str, local: Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{TMP_MARK}{uuid.uuid4().hex}")
        try:
            with self._errors("read", name, missing="object"):
                self.bucket.blob(self._name(name)).download_to_filename(
                    str(tmp), checksum="crc32c", retry=self.retry, timeout=self.timeout)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, name: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            with self._errors("read", name):
                return self.bucket.blob(self._name(name)).download_as_bytes(
                    checksum="crc32c", retry=self.retry, timeout=self.timeout)
        except StorageError as e:
            if isinstance(e.__cause__, NotFound):
                return None
            raise

    def read(self, name: str) -> tuple[bytes, int] | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(5):  # the object may be replaced between the two requests: read that generation or again
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
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self._name(name))
        try:
            with self._errors("write", name):
                blob.upload_from_string(data, checksum="crc32c", if_generation_match=generation,
                                        retry=self.retry, timeout=self.timeout)
        except PreconditionFailed:
            return self._settle(name, len(data), _crc32c_of_bytes(data), generation, "new content")
        return self._remote(name, blob)

    def delete(self, name: str, *, generation: int | None) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            with self._errors("delete", name):
                self.bucket.blob(self._name(name)).delete(if_generation_match=generation, retry=self.retry,
                                                          timeout=self.timeout)
        except PreconditionFailed:
            raise RemoteChanged(f"{self._where(name)} changed remotely (not generation {generation}); not deleted")
        except StorageError as e:
            if not isinstance(e.__cause__, NotFound):
                raise

    def probe(self) -> None:
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        blob = self.bucket.blob(self._name(name))
        with self._errors("write", None, deadline_s=self.probe_deadline_s):
            blob.upload_from_string(b"probe", if_generation_match=0, retry=self.probe_retry, timeout=self.timeout)
            blob.delete(if_generation_match=blob.generation, retry=self.probe_retry, timeout=self.timeout)


def _crc32c_of_bytes(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


# ----------------------------------------------------------------------------------------------------------------
# file://


class LocalBackend:
    """A local folder with the bucket's semantics (a missing folder is an empty bucket): atomic writes (temporary
    file + os.replace), crc32c computed on listing (cached by size and mtime), and generations: a file's
    st_mtime_ns, which every write (a new file renamed into place) changes. Conditional writes and deletes take an
    exclusive lock on the folder (flock on the folder itself, so between processes too) around the check and the
    rename."""

    def __init__(self, root: Path, *, cache: Crc32cCache | None = None):
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self.retries = 0
        self._cache = cache if cache is not None else Crc32cCache()
        self._thread_lock = threading.Lock()

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise StorageError(
                f"{self.url}: object name {name!r} would escape the folder or is not a plain relative name")
        return self.root.joinpath(*parts)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            fd = os.open(self.root, os.O_RDONLY)  # flock on the folder itself: no lock file among the objects
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
        """Copy src to a temporary file next to dest, hashing on the way; returns the temporary file and its crc32c."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}{TMP_MARK}{uuid.uuid4().hex}")
        checksum = google_crc32c.Checksum()
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_READ_CHUNK):
                checksum.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        got = base64.b64encode(checksum.digest()).decode("ascii")
        if expect_crc32c is not None and got != expect_crc32c:
            tmp.unlink(missing_ok=True)
            raise StorageError(
                f"{src} has crc32c {got}, not {expect_crc32c} as hashed before: it changed during the copy",
                transient=True)
        return tmp, got

    def _place(self, tmp: Path, dest: Path, name: str, generation: int | None, crc32c: str, what: str) -> RemoteFile:
        """Rename tmp to dest if dest is at `generation` (0: absent); else success only for identical content."""
        try:
            with self._locked():
                if generation is not None:
                    current = self.stat(name)
                    if (0 if current is None else current.generation) != generation:
                        size = tmp.stat().st_size
                        if current is not None and (current.size, current.crc32c) == (size, crc32c):
                            return current
                        if current is None:
                            raise RemoteChanged(f"{self.url}/{name}: conditional write refused and the object is gone; "
                                                f"retry")
                        if generation == 0:
                            raise RemoteChanged(
                                f"{self.url}/{name} already exists with different content (size {current.size}, "
                                f"crc32c {current.crc32c}; {what}: size {size}, crc32c {crc32c}); refusing to "
                                f"overwrite it")
                        raise RemoteChanged(f"{self.url}/{name} changed remotely (generation {current.generation}, "
                                            f"expected {generation}); refusing to overwrite it")
                os.replace(tmp, dest)
                return self._remote(name, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, local: Path, name: str, *, crc32c: str | None, generation: int | None) -> RemoteFile:
        dest = self._path(name)
        try:
            before = _stat_key(Path(local))
            tmp, got = self._copy_in(Path(local), dest, crc32c)
            if _changed(Path(local), before):
                tmp.unlink(missing_ok=True)
                raise StorageError(f"cannot copy {local} to {self.url}/{name}: the local file changed during the copy",
                                   transient=True)
            return self._place(tmp, dest, name, generation, got, str(local))
        except OSError as e:
            raise StorageError(f"cannot copy {local} to {self.url}/{name}: {one_line(e)}") from e

    def download_file(self, name: str, local: Path) -> None:
        src = self._path(name)
        local = Path(local)
        try:
            tmp, _ = self._copy_in(src, local, None)
            try:
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError as e:
            if not src.is_file():
                raise StorageError(f"cannot read {self.url}/{name}: the object does not exist") from e
            raise StorageError(f"cannot copy {self.url}/{name} to {local}: {one_line(e)}") from e
        except OSError as e:
            raise StorageError(f"cannot copy {self.url}/{name} to {local}: {one_line(e)}") from e

    def read_bytes(self, name: str) -> bytes | None:
        got = self.read(name)
        return None if got is None else got[0]

    def read(self, name: str) -> tuple[bytes, int] | None:
        try:
            with open(self._path(name), "rb") as f:  # the generation of the very file read (renames replace it)
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
            return self._place(tmp, dest, name, generation, _crc32c_of_bytes(data), "new content")
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
                        raise RemoteChanged(f"{self.url}/{name} changed remotely (not generation {generation}); "
                                            f"not deleted")
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
            raise StorageError(f"cannot write {self.url} (must be a writable folder): {one_line(e)}") from e
