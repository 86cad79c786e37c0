"""rsync between a local folder and a Backend (gs:// or a folder), either direction.

Copy semantics are gsutil rsync's, minus deletion: a file whose size and crc32c already match
remotely is skipped, everything else is sent in parallel, and the result is checked against a fresh
listing, so "done" means "verified remote". Nothing remote is ever deleted by a sync, and every
write is conditional on the generation the listing showed (a new name is created only if still
absent), so two writers never silently overwrite each other. A caller may pass a guard that refuses
some writes (`neox-sync` refuses to write into published checkpoints: see
checkpoint.copy_rules.protect_published).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from neox_train.config import DEFAULT_TRANSFER_STREAMS
from neox_train.errors import StorageError
from neox_train.remote import open_backend
from neox_train.remote.base import Backend, RemoteFile, parse_url
from neox_train.remote.files import TMP_MARK, Crc32cCache

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class SyncResult:
    files_uploaded: int = 0
    files_skipped: int = 0
    bytes_uploaded: int = 0
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    retries: int = 0  # requests the storage client retried (503s, resets, timeouts)
    seconds: float = 0.0
    # neox-sync --checkpoints: tags now COMPLETE remotely
    published: list[str] = field(default_factory=list)
    # ... and the tags it left alone, with why
    not_published: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dir_prefix(remote_prefix: str) -> str:
    """"a/b" -> "a/b/": a folder, so that tag global_step1 never lists global_step10's files."""
    p = remote_prefix.strip("/")
    return f"{p}/" if p else ""


def local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative '/'-path, path) of every file under root, nested folders included, sorted;
    temporary files of an atomic write in progress are not content."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            path = Path(dirpath, fn)
            if TMP_MARK not in fn and path.is_file():
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def check_relative(rel: str, what: str) -> None:
    """A remote name must land inside the destination folder: no absolute path, '..', '.', empty
    part or '\\'."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\0" in rel or any(
            p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"{what}: refusing to download a name that is absolute or has '..', '.', empty or "
            f"backslash parts (valid: a plain relative path like dir/file.npy)"
        )


def parallel(fn: Callable[[T], R], items: Iterable[T], workers: int,
             on_done: Callable[[T, R], None]) -> None:
    """fn over items on `workers` threads; the first failure cancels what has not started and is
    raised."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))),
                            thread_name_prefix="neox-sync") as pool:
        futures = {pool.submit(fn, item): item for item in items}
        try:
            for fut in as_completed(futures):
                on_done(futures[fut], fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def progress_bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, disable=not progress, dynamic_ncols=True)


def hash_local(files: list[tuple[str, Path]], cache: Crc32cCache,
               workers: int) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}

    def one(item: tuple[str, Path]) -> tuple[int, str]:
        try:
            return item[1].stat().st_size, cache.get(item[1])
        except OSError as e:
            raise StorageError(f"cannot read {item[1]}: {e.strerror or e}") from e

    parallel(one, files, workers, lambda item, r: out.__setitem__(item[0], r))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported by the pipeline, which reads it again


# Called before a file is written: (relative path, the remote object it replaces or None for a new
# name, the listing it was decided on); raises to refuse the write.
Guard = Callable[[str, "RemoteFile | None", "dict[str, RemoteFile]"], None]


def upload_tree(local_dir: Path, backend: Backend, remote_prefix: str, *, workers: int,
                cache: Crc32cCache | None, progress: bool, gate: Callable[[], None] | None = None,
                files: list[tuple[str, Path]] | None = None,
                listing: dict[str, RemoteFile] | None = None,
                guard: Guard | None = None) -> tuple[SyncResult, dict[str, tuple[int, str]]]:
    started, retries0 = time.monotonic(), backend.retries
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(
            f"{local_dir} is not a folder (the source of an upload must be a local folder)")
    prefix = dir_prefix(remote_prefix)
    files = local_files(local_dir) if files is None else files
    cache = cache if cache is not None else Crc32cCache()
    result = SyncResult()
    local: dict[str, tuple[int, str]] = {}

    # One pipeline per file: hash (or cache hit) -> compare with the remote listing -> upload or
    # skip. The listing runs on its own thread while the first files hash, and later files hash
    # while earlier ones upload, so the checks cost (almost) no wall time next to a plain upload of
    # the same files.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neox-sync-list") as lister, \
            progress_bar(progress, sum(_size(p) for _, p in files), f"upload {backend.url}") as bar:
        remote = lister.submit(lambda: listing if listing is not None else backend.list(prefix))

        def one(item: tuple[str, Path]) -> tuple[int, str, bool]:
            rel, path = item
            have = remote.result().get(prefix + rel)
            if gate is not None:
                gate()  # e.g. wait while the trainer writes the next checkpoint
            try:
                st = path.stat()
                size = st.st_size
                if have is not None and have.size == size:
                    # same name and size remotely: only the content hash can tell
                    crc = cache.get(path)
                    if have.crc32c == crc:
                        return size, crc, False
                else:
                    # Not remote (or another size): it uploads either way, so a file not hashed yet
                    # is hashed while it is sent, one read instead of two (a multi-GB shard is not
                    # read twice from disk).
                    crc = cache.peek(path)
            except OSError as e:
                raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
            if guard is not None:
                guard(rel, have, remote.result())
            # Conditional on what the listing showed: a new name only if still absent, a replacement
            # only of that generation. A retried upload whose first attempt landed is recognised,
            # not doubled; a write that would overwrite someone else's newer object is refused.
            stored = backend.upload_file(path, prefix + rel, crc32c=crc,
                                         generation=0 if have is None else have.generation)
            if crc is None:
                cache.put(path, (st.st_size, st.st_mtime_ns), stored.crc32c)
            return size, stored.crc32c, True

        def done(item: tuple[str, Path], outcome: tuple[int, str, bool]) -> None:
            size, crc, uploaded = outcome
            local[item[0]] = (size, crc)
            if uploaded:
                result.files_uploaded += 1
                result.bytes_uploaded += size
            else:
                result.files_skipped += 1
            bar.update(size)

        parallel(one, files, workers, done)
        remote.result()  # with no local files, a listing failure still surfaces

    mismatch = first_mismatch(backend.list(prefix), prefix, local)
    if mismatch:
        rel, found, size, crc = mismatch
        if found == "missing":
            raise StorageError(f"verification after upload failed: {backend.url}/{prefix}{rel} is "
                               "missing",
                               transient=True)
        raise StorageError(
            f"verification after upload failed: {backend.url}/{prefix}{rel} has {found}, "
            f"{local_dir / rel} has size {size} crc32c {crc}", transient=True)
    result.retries = backend.retries - retries0
    result.seconds = time.monotonic() - started
    return result, local


def sync_up(local_dir: Path, backend: Backend, remote_prefix: str, *, workers: int = 8,
            cache: Crc32cCache | None = None, progress: bool = False,
            guard: Callable[[Backend, str], Guard] | None = None) -> SyncResult:
    """local_dir -> remote_prefix/, folder structure preserved: upload what differs (size or
    crc32c), verify all.

    With a persistent `cache`, an unchanged file costs a stat, not a read. Never deletes remote
    files. `guard` (backend, prefix) -> a Guard that may refuse writes (`neox-sync` passes the rule
    that protects published checkpoints, checkpoint.copy_rules.protect_published).
    """
    return upload_tree(local_dir, backend, remote_prefix, workers=workers, cache=cache,
                       progress=progress,
                       guard=guard(backend, dir_prefix(remote_prefix)) if guard else None)[0]


def sync_down(backend: Backend, remote_prefix: str, local_dir: Path, *, workers: int = 8,
              skip_existing: bool = True, verify: bool = True,
              progress: bool = False) -> SyncResult:
    """remote_prefix/ -> local_dir, nested folders preserved.

    skip_existing: leave a local file that exists (with verify, only if its size also matches the
    remote one). Every name is checked before anything is downloaded: one that would land outside
    local_dir is an error. Zero-byte names ending in '/' are folder placeholders (the Cloud Console
    makes them) and are skipped.
    """
    started, retries0 = time.monotonic(), backend.retries
    prefix = dir_prefix(remote_prefix)
    remote = backend.list(prefix)
    if not remote:
        where = f"{backend.url}/{prefix}" if prefix else backend.url
        raise StorageError(f"nothing to download: no objects under {where} (check the URL)")
    plan = []
    for name, rf in sorted(remote.items()):
        rel = name[len(prefix):]
        if rel == "" or (rel.endswith("/") and rf.size == 0):
            continue
        check_relative(rel, f"{backend.url}/{name}")
        plan.append((name, rel, rf.size))
    folders = {rel.rsplit("/", 1)[0] for _, rel, _ in plan if "/" in rel}
    folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
    for name, rel, _ in plan:
        if rel in folders:
            raise StorageError(
                f"{backend.url}/{name} is both an object and a folder prefix; it cannot be laid "
                "out as local files")

    local_dir = Path(local_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise StorageError(f"{local_dir} exists and is not a folder (the destination of a download "
                           "must be a folder)")
    result = SyncResult()
    todo = []
    for name, rel, size in plan:
        dest = local_dir.joinpath(*rel.split("/"))
        if skip_existing and dest.is_file() and (not verify or dest.stat().st_size == size):
            result.files_skipped += 1
        else:
            todo.append((name, dest, size))

    with progress_bar(progress, sum(t[2] for t in todo), f"download {backend.url}") as bar:
        def fetch(item: tuple[str, Path, int]) -> int:
            backend.download_file(item[0], item[1], size=item[2])
            return item[2]

        def done(_item: Any, size: int) -> None:
            result.files_downloaded += 1
            result.bytes_downloaded += size
            bar.update(size)

        parallel(fetch, todo, workers, done)
    result.retries = backend.retries - retries0
    result.seconds = time.monotonic() - started
    return result


def sync(src: str, dst: str, *, credentials: str | None = None,
         workers: int = DEFAULT_TRANSFER_STREAMS, parallel_uploads: bool = True,
         progress: bool = False, guard: Callable[[Backend, str], Guard] | None = None,
         check: Callable[[Path, Backend], None] | None = None) -> SyncResult:
    """`neox-sync SRC DST`: local -> gs://, gs:// -> local, or local -> local. Downloads skip local
    files of the remote size (gsutil rsync's size check); uploads skip remote files of equal size
    and crc32c. `check` (source folder, destination backend) runs before an upload and may refuse it
    whole; it shares the upload's backend, so a folder destination's files are hashed once."""
    skind, swhere, _ = parse_url(src)
    dkind, dwhere, _ = parse_url(dst)
    if skind == "gs" and dkind == "gs":
        raise StorageError(
            f"{src} -> {dst}: both sides are gs:// URLs; one side must be a local folder")
    if skind == "gs":
        return sync_down(open_backend(src, credentials=credentials, streams=workers), "",
                         Path(dwhere),
                         workers=workers, skip_existing=True, verify=True, progress=progress)
    src_dir = Path(swhere)
    if not src_dir.is_dir():
        raise StorageError(
            f"{src}: no such folder (the source must be a local folder or a gs:// URL)")
    if dkind == "file" and (Path(dwhere) == src_dir or src_dir in Path(dwhere).parents):
        raise StorageError(f"{dst} is inside {src}: copying a folder into itself would never end")
    backend = open_backend(dst, credentials=credentials, streams=workers,
                           parallel_uploads=parallel_uploads)
    if check is not None:
        check(src_dir, backend)
    return sync_up(src_dir, backend, "", workers=workers, progress=progress, guard=guard)


# --------------------------------------------------------------------------------------------------
# checkpoints


def first_mismatch(listing: dict[str, RemoteFile], key_prefix: str,
                   files: dict[str, tuple[int, str]]) -> tuple[str, str, int, str] | None:
    """The first file (sorted) whose remote object `key_prefix + rel` is missing or differs in size
    or crc32c: (relative path, what was found, expected size, expected crc32c); None when all
    match."""
    for rel, (size, crc) in sorted(files.items()):
        got = listing.get(key_prefix + rel)
        if got is None or got.size != size or got.crc32c != crc:
            return (rel, "missing" if got is None else f"size {got.size} crc32c {got.crc32c}",
                    size, crc)
    return None


