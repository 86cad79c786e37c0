"""rsync between a local folder and a Backend, and checkpoint publication/fetch on top of it.

Copy semantics are gsutil rsync's, minus deletion: a file whose size and crc32c already match remotely is skipped,
everything else is sent in parallel, and the result is checked against a fresh listing, so "done" means "verified
remote". Nothing remote is ever deleted by a sync.

A published checkpoint, relative to the backend root:

    <tag>/...files...              the same relative paths as SAVE_DIR/<tag>/
    <tag>/.parts/node-<k>.json     what node k uploaded: {"node": k, "files": {relpath: {"size", "crc32c"}}}
    <tag>/manifest.json            the merged parts: {"tag", "step", "files", "num_nodes", "created"}
    <tag>/COMPLETE                 written last, only after a listing matched the manifest
    latest                         the bare tag (DeepSpeed's format); moved after COMPLETE, and only forward

So a reader that sees COMPLETE can trust the manifest, and every manifest file is there with its crc32c; a reader
that sees no COMPLETE ignores the tag, whatever else is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from .storage import Backend, Crc32cCache, RemoteFile, StorageError, crc32c_of_file, open_backend, parse_url

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
LATEST = "latest"
PARTS = ".parts"
_STEP_RE = re.compile(r"global_step(\d+)")


class CheckpointConflict(StorageError):
    """The tag is already published (COMPLETE) remotely with other content. Retrying cannot help: a published
    checkpoint is never overwritten, so the local one must be saved under a new tag (or the remote one deleted)."""

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class SyncResult:
    files_uploaded: int = 0
    files_skipped: int = 0
    bytes_uploaded: int = 0
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    retries: int = 0  # transient errors the storage client retried (503s, resets, timeouts)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_of(tag: str) -> int:
    """The N of `global_stepN` in a tag; -1 for a tag without one (it sorts first and never moves `latest`)."""
    m = _STEP_RE.search(tag)
    return int(m.group(1)) if m else -1


def _dir_prefix(remote_prefix: str) -> str:
    """"a/b" -> "a/b/": a folder, so that tag global_step1 never lists global_step10's files."""
    p = remote_prefix.strip("/")
    return f"{p}/" if p else ""


def _local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative '/'-path, path) of every file under root, nested folders included, sorted."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            path = Path(dirpath, fn)
            if path.is_file():
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def _check_relative(rel: str, what: str) -> None:
    """A remote name must land inside the destination folder: no absolute path, '..', '.', empty part or '\\'."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"{what}: refusing to download a name that is absolute or has '..', '.', empty or backslash parts "
            f"(valid: a plain relative path like dir/file.npy)"
        )


def _parallel(fn: Callable[[T], R], items: Iterable[T], workers: int, on_done: Callable[[T, R], None]) -> None:
    """fn over items on `workers` threads; the first failure cancels what has not started and is raised."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))), thread_name_prefix="neox-sync") as pool:
        futures = {pool.submit(fn, item): item for item in items}
        try:
            for fut in as_completed(futures):
                on_done(futures[fut], fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=not progress, dynamic_ncols=True)


def _hash_local(files: list[tuple[str, Path]], cache: Crc32cCache, workers: int) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}

    def one(item: tuple[str, Path]) -> tuple[int, str]:
        try:
            return item[1].stat().st_size, cache.get(item[1])
        except OSError as e:
            raise StorageError(f"cannot read {item[1]}: {e.strerror or e}") from e

    _parallel(one, files, workers, lambda item, r: out.__setitem__(item[0], r))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported by the pipeline, which reads it again


def _sync_up(local_dir: Path, backend: Backend, remote_prefix: str, *, workers: int, cache: Crc32cCache | None,
             progress: bool, gate: Callable[[], None] | None = None,
             files: list[tuple[str, Path]] | None = None) -> tuple[SyncResult, dict[str, tuple[int, str]]]:
    started, retries0 = time.monotonic(), backend.retries
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir} is not a folder (the source of an upload must be a local folder)")
    prefix = _dir_prefix(remote_prefix)
    files = _local_files(local_dir) if files is None else files
    cache = cache if cache is not None else Crc32cCache()
    result = SyncResult()
    local: dict[str, tuple[int, str]] = {}

    # One pipeline per file: hash (or cache hit) -> compare with the remote listing -> upload or skip. The listing
    # runs on its own thread while the first files hash, and later files hash while earlier ones upload, so the
    # checks cost (almost) no wall time next to a plain upload of the same files.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neox-sync-list") as lister, \
            _bar(progress, sum(_size(p) for _, p in files), f"upload {backend.url}") as bar:
        listing = lister.submit(backend.list, prefix)

        def one(item: tuple[str, Path]) -> tuple[int, str, bool]:
            rel, path = item
            have = listing.result().get(prefix + rel)
            if gate is not None:
                gate()  # e.g. wait while the trainer writes the next checkpoint
            try:
                st = path.stat()
                size = st.st_size
                if have is not None and have.size == size:
                    crc = cache.get(path)  # same name and size remotely: only the content hash can tell
                    if have.crc32c == crc:
                        return size, crc, False
                else:
                    # Not remote (or another size): it uploads either way, so a file not hashed yet is hashed
                    # while it is sent, one read instead of two (a multi-GB shard is not read twice from disk).
                    crc = cache.peek(path)
            except OSError as e:
                raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
            # Create-only for new names: a retried upload whose first attempt landed is recognised, not doubled.
            stored = backend.upload_file(path, prefix + rel, crc32c=crc, if_absent=have is None)
            if crc is None:
                cache.put(path, (st.st_size, st.st_mtime_ns), stored)
            return size, stored, True

        def done(item: tuple[str, Path], outcome: tuple[int, str, bool]) -> None:
            size, crc, uploaded = outcome
            local[item[0]] = (size, crc)
            if uploaded:
                result.files_uploaded += 1
                result.bytes_uploaded += size
            else:
                result.files_skipped += 1
            bar.update(size)

        _parallel(one, files, workers, done)
        listing.result()  # with no local files, a listing failure still surfaces

    mismatch = _first_mismatch(backend.list(prefix), prefix, local)
    if mismatch:
        rel, found, size, crc = mismatch
        if found == "missing":
            raise StorageError(f"verification after upload failed: {backend.url}/{prefix}{rel} is missing")
        raise StorageError(
            f"verification after upload failed: {backend.url}/{prefix}{rel} has {found}, {local_dir / rel} has size "
            f"{size} crc32c {crc}"
        )
    result.retries = backend.retries - retries0
    result.seconds = time.monotonic() - started
    return result, local


def sync_up(local_dir: Path, backend: Backend, remote_prefix: str, *, workers: int = 8,
            cache: Crc32cCache | None = None, progress: bool = False) -> SyncResult:
    """local_dir -> remote_prefix/, folder structure preserved: upload what differs (size or crc32c), verify all.

    With a persistent `cache`, an unchanged file costs a stat, not a read. Never deletes remote files.
    """
    return _sync_up(local_dir, backend, remote_prefix, workers=workers, cache=cache, progress=progress)[0]


def sync_down(backend: Backend, remote_prefix: str, local_dir: Path, *, workers: int = 8, skip_existing: bool = True,
              verify: bool = True, progress: bool = False) -> SyncResult:
    """remote_prefix/ -> local_dir, nested folders preserved.

    skip_existing: leave a local file that exists (with verify, only if its size also matches the remote one).
    Every name is checked before anything is downloaded: one that would land outside local_dir is an error.
    Zero-byte names ending in '/' are folder placeholders (the Cloud Console makes them) and are skipped.
    """
    started, retries0 = time.monotonic(), backend.retries
    prefix = _dir_prefix(remote_prefix)
    remote = backend.list(prefix)
    if not remote:
        where = f"{backend.url}/{prefix}" if prefix else backend.url
        raise StorageError(f"nothing to download: no objects under {where} (check the URL)")
    plan = []
    for name, rf in sorted(remote.items()):
        rel = name[len(prefix):]
        if rel == "" or (rel.endswith("/") and rf.size == 0):
            continue
        _check_relative(rel, f"{backend.url}/{name}")
        plan.append((name, rel, rf.size))
    folders = {rel.rsplit("/", 1)[0] for _, rel, _ in plan if "/" in rel}
    folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
    for name, rel, _ in plan:
        if rel in folders:
            raise StorageError(
                f"{backend.url}/{name} is both an object and a folder prefix; it cannot be laid out as local files")

    local_dir = Path(local_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise StorageError(f"{local_dir} exists and is not a folder (the destination of a download must be a folder)")
    result = SyncResult()
    todo = []
    for name, rel, size in plan:
        dest = local_dir.joinpath(*rel.split("/"))
        if skip_existing and dest.is_file() and (not verify or dest.stat().st_size == size):
            result.files_skipped += 1
        else:
            todo.append((name, dest, size))

    with _bar(progress, sum(t[2] for t in todo), f"download {backend.url}") as bar:
        def fetch(item: tuple[str, Path, int]) -> int:
            backend.download_file(item[0], item[1])
            return item[2]

        def done(_item: Any, size: int) -> None:
            result.files_downloaded += 1
            result.bytes_downloaded += size
            bar.update(size)

        _parallel(fetch, todo, workers, done)
    result.retries = backend.retries - retries0
    result.seconds = time.monotonic() - started
    return result


def sync(src: str, dst: str, *, credentials: str | None = None, workers: int = 8, progress: bool = False) -> SyncResult:
    """`neox-sync SRC DST`: local -> gs://, gs:// -> local, or local -> local. Downloads skip local files of the
    remote size (gsutil rsync's size check); uploads skip remote files of equal size and crc32c."""
    skind, swhere, _ = parse_url(src)
    dkind, dwhere, _ = parse_url(dst)
    if skind == "gs" and dkind == "gs":
        raise StorageError(f"{src} -> {dst}: both sides are gs:// URLs; one side must be a local folder")
    if skind == "gs":
        return sync_down(open_backend(src, credentials=credentials), "", Path(dwhere), workers=workers,
                         skip_existing=True, verify=True, progress=progress)
    src_dir = Path(swhere)
    if not src_dir.is_dir():
        raise StorageError(f"{src}: no such folder (the source must be a local folder or a gs:// URL)")
    if dkind == "file" and (Path(dwhere) == src_dir or src_dir in Path(dwhere).parents):
        raise StorageError(f"{dst} is inside {src}: copying a folder into itself would never end")
    return sync_up(src_dir, open_backend(dst, credentials=credentials), "", workers=workers, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _check_tag(tag: str) -> None:
    if not tag or "/" in tag or "\\" in tag or tag.startswith(".") or tag == LATEST:
        raise StorageError(f"checkpoint tag {tag!r} is not a plain folder name (valid: e.g. global_step100)")


def _read_json(backend: Backend, name: str) -> dict[str, Any] | None:
    raw = backend.read_bytes(name)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StorageError(f"{backend.url}/{name} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise StorageError(f"{backend.url}/{name} has no \"files\" object (it was not written by neox-train)")
    return data


def _file_entry(meta: Any, where: str) -> tuple[int, str]:
    try:
        return int(meta["size"]), str(meta["crc32c"])
    except (TypeError, KeyError, ValueError) as e:
        raise StorageError(f"{where}: entry {meta!r} lacks an integer \"size\" and a \"crc32c\"") from e


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# Files DeepSpeed writes once per node under `checkpoint.use_node_local_storage` (each node's local rank 0 saves
# the model states; ZeRO-3 names its per-rank files zero_pp_rank_N_..., which do not match).
NODE_REPLICATED = re.compile(r"^mp_rank_\d+_model_states\.pt$")


def upload_checkpoint_part(save_dir: Path, tag: str, backend: Backend, *, node_rank: int = 0, workers: int = 8,
                           cache: Crc32cCache | None = None, run_id: str | None = None,
                           gate: Callable[[], None] | None = None) -> SyncResult:
    """Upload this node's files of SAVE_DIR/<tag> to <tag>/ and record them in <tag>/.parts/node-<node_rank>.json.

    run_id (optional, the same on every node of one run): finalize waits until all parts carry the same one, so a
    part left by an earlier, crashed run that saved the same tag is never merged with this run's files.
    A tag that is already COMPLETE remotely is never overwritten: identical local files are a no-op, different
    ones a StorageError (a published checkpoint is immutable; save under a new tag or delete the remote one).
    """
    _check_tag(tag)
    folder = Path(save_dir) / tag
    if not folder.is_dir():
        raise StorageError(f"checkpoint folder {folder} does not exist")
    files = _local_files(folder)
    for rel, path in files:
        if rel in (MANIFEST, COMPLETE) or rel.startswith(f"{PARTS}/"):
            raise StorageError(
                f"{path}: {rel!r} is a name reserved for the published checkpoint's bookkeeping; rename it")

    if node_rank > 0:
        # With node-local storage every node's local rank 0 writes the (ZeRO-0/1/2) model states: the same weights
        # and client state on every node, but not byte-identical files (pickles). Node 0's copy is the checkpoint's;
        # the others stay local, or two nodes would race for one object name with different bytes.
        files = [(rel, path) for rel, path in files if not NODE_REPLICATED.match(rel)]
    if backend.read_bytes(f"{tag}/{COMPLETE}") is not None:
        return _check_already_published(folder, files, backend, tag, cache, workers)

    result, local = _sync_up(folder, backend, tag, workers=workers, cache=cache, progress=False, gate=gate,
                             files=files)
    part: dict[str, Any] = {
        "node": node_rank,
        "files": {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in sorted(local.items())},
    }
    if run_id is not None:
        part["run_id"] = run_id
    backend.write_bytes(f"{tag}/{PARTS}/node-{node_rank}.json", _dumps(part))
    return result


def _check_already_published(folder: Path, files: list[tuple[str, Path]], backend: Backend, tag: str,
                             cache: Crc32cCache | None, workers: int) -> SyncResult:
    manifest = _read_json(backend, f"{tag}/{MANIFEST}")
    if manifest is None:
        raise StorageError(f"{backend.url}/{tag} has {COMPLETE} but no {MANIFEST}; it is damaged (delete it remotely)")
    local = _hash_local(files, cache if cache is not None else Crc32cCache(), workers)
    for rel, (size, crc) in sorted(local.items()):
        meta = manifest["files"].get(rel)
        if meta is None or _file_entry(meta, f"{backend.url}/{tag}/{MANIFEST}") != (size, crc):
            raise CheckpointConflict(
                f"{backend.url}/{tag} is already published (COMPLETE) with different content ({folder / rel} is "
                f"{'not in its manifest' if meta is None else 'different'}); a published checkpoint is never "
                f"overwritten: save under a new tag or delete the remote one"
            )
    return SyncResult(files_skipped=len(local))


def _first_mismatch(listing: dict[str, RemoteFile], key_prefix: str, files: dict[str, tuple[int, str]]
                    ) -> tuple[str, str, int, str] | None:
    """The first file (sorted) whose remote object `key_prefix + rel` is missing or differs in size or crc32c:
    (relative path, what was found, expected size, expected crc32c); None when all match."""
    for rel, (size, crc) in sorted(files.items()):
        got = listing.get(key_prefix + rel)
        if got is None or got.size != size or got.crc32c != crc:
            return rel, "missing" if got is None else f"size {got.size} crc32c {got.crc32c}", size, crc
    return None


def finalize_checkpoint(backend: Backend, tag: str, *, num_nodes: int = 1) -> bool:
    """Publish <tag> once every node's part is there: manifest, then COMPLETE, then `latest` (forward only).

    False: some part is missing (poll again). True: the tag is COMPLETE. Idempotent: on a COMPLETE tag only
    `latest` may move (forward). A file that the parts list but the bucket lacks or holds with another size or
    crc32c is a StorageError, and nothing is published.
    """
    _check_tag(tag)
    if num_nodes < 1:
        raise StorageError(f"finalize {tag}: num_nodes={num_nodes} (valid: 1 or more)")
    if backend.read_bytes(f"{tag}/{COMPLETE}") is not None:
        _advance_latest(backend, tag)
        return True
    listing = backend.list(f"{tag}/")
    part_names = [f"{tag}/{PARTS}/node-{k}.json" for k in range(num_nodes)]
    if any(name not in listing for name in part_names):
        return False

    files: dict[str, tuple[int, str]] = {}
    run_ids = set()
    for name in part_names:
        part = _read_json(backend, name)
        if part is None:  # deleted since the listing
            return False
        run_ids.add(part.get("run_id"))
        for rel, meta in part["files"].items():
            entry = _file_entry(meta, f"{backend.url}/{name}")
            if files.setdefault(rel, entry) != entry:
                raise StorageError(
                    f"cannot finalize {backend.url}/{tag}: two nodes uploaded {rel} with different content")
    if len(run_ids) > 1:
        return False  # a part from an earlier run of the same tag: wait for its node to upload this run's

    mismatch = _first_mismatch(listing, f"{tag}/", files)
    if mismatch:
        rel, found, size, crc = mismatch
        raise StorageError(
            f"cannot finalize {backend.url}/{tag}: {rel} is {found} remotely, its node uploaded size {size} "
            f"crc32c {crc}"
        )
    manifest = {
        "tag": tag,
        "step": step_of(tag),
        "num_nodes": num_nodes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in sorted(files.items())},
    }
    backend.write_bytes(f"{tag}/{MANIFEST}", _dumps(manifest))
    # Deterministic content, so a retried create whose first attempt landed counts as success.
    backend.write_bytes(f"{tag}/{COMPLETE}", _dumps({"tag": tag, "step": step_of(tag)}), if_absent=True)
    _advance_latest(backend, tag)
    return True


def _advance_latest(backend: Backend, tag: str) -> None:
    current = backend.read_bytes(LATEST)
    if current is not None:
        cur = current.decode("utf-8", "replace").strip()
        if cur == tag or step_of(cur) >= step_of(tag):
            return
    backend.write_bytes(LATEST, tag.encode())


def remote_checkpoints(backend: Backend) -> list[str]:
    """Tags with both COMPLETE and a manifest, oldest step first."""
    listing = backend.list("")
    tags = [name[: -len(COMPLETE) - 1] for name in listing if name.endswith(f"/{COMPLETE}") and name.count("/") == 1]
    return sorted((t for t in tags if f"{t}/{MANIFEST}" in listing), key=lambda t: (step_of(t), t))


def remote_latest(backend: Backend) -> str | None:
    """The tag the `latest` pointer names when it is COMPLETE, else the newest COMPLETE tag, else None."""
    pointer = backend.read_bytes(LATEST)
    if pointer is not None:
        tag = pointer.decode("utf-8", "replace").strip()
        try:
            _check_tag(tag)
        except StorageError:
            tag = ""
        if tag and all(backend.read_bytes(f"{tag}/{name}") is not None for name in (COMPLETE, MANIFEST)):
            return tag
    tags = remote_checkpoints(backend)
    return tags[-1] if tags else None


def fetch_checkpoint(backend: Backend, tag: str, save_dir: Path, *, workers: int = 8, progress: bool = False) -> Path:
    """Download COMPLETE checkpoint <tag> to SAVE_DIR/<tag> (verified against its manifest) and point
    SAVE_DIR/latest at it. Returns SAVE_DIR/<tag>.

    Files go to SAVE_DIR/.<tag>.partial first and are renamed into place only when every one has the manifest's
    size and crc32c, so SAVE_DIR/<tag> is never half there. Local files that already match are reused.
    """
    _check_tag(tag)
    where = f"{backend.url}/{tag}"
    if backend.read_bytes(f"{tag}/{COMPLETE}") is None:
        complete = remote_checkpoints(backend)
        raise StorageError(
            f"{where} is not a complete checkpoint (no {COMPLETE} marker: its upload never finished); "
            f"complete ones: {', '.join(complete) if complete else 'none'}"
        )
    manifest = _read_json(backend, f"{tag}/{MANIFEST}")
    if manifest is None:
        raise StorageError(f"{where} has {COMPLETE} but no {MANIFEST}; it is damaged (fetch another tag)")
    files = {rel: _file_entry(meta, f"{where}/{MANIFEST}") for rel, meta in manifest["files"].items()}
    for rel in files:
        _check_relative(rel, f"{where}/{MANIFEST} entry {rel!r}")
    # Fail before downloading gigabytes if the bucket no longer matches the manifest.
    listing = backend.list(f"{tag}/")
    mismatch = _first_mismatch(listing, f"{tag}/", files)
    if mismatch:
        rel, found, size, crc = mismatch
        raise StorageError(
            f"{where}/{rel} is {found}, but the manifest says size {size} crc32c {crc}: the remote checkpoint "
            f"is damaged (fetch another tag)"
        )

    save_dir = Path(save_dir)
    final = save_dir / tag
    partial = save_dir / f".{tag}.partial"

    def matches(path: Path, size: int, crc: str) -> bool:
        return path.is_file() and path.stat().st_size == size and crc32c_of_file(path) == crc

    local_ok = {rel for rel, (size, crc) in files.items() if matches(final.joinpath(*rel.split("/")), size, crc)}
    if final.is_dir() and len(local_ok) == len(files):
        _write_latest(save_dir, tag)
        return final

    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        for rel in local_ok:
            src, dest = final.joinpath(*rel.split("/")), partial.joinpath(*rel.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)
        todo = sorted(rel for rel in files if rel not in local_ok)
        with _bar(progress, sum(files[rel][0] for rel in todo), f"fetch {tag}") as bar:
            def fetch(rel: str) -> None:
                dest = partial.joinpath(*rel.split("/"))
                backend.download_file(f"{tag}/{rel}", dest)
                size, crc = files[rel]
                got_size = dest.stat().st_size
                got_crc = crc32c_of_file(dest)
                if (got_size, got_crc) != (size, crc):
                    raise StorageError(
                        f"{where}/{rel} downloaded with size {got_size} crc32c {got_crc}, but the manifest says size "
                        f"{size} crc32c {crc}; the checkpoint was not installed"
                    )

            _parallel(fetch, todo, workers, lambda rel, _r: bar.update(files[rel][0]))
        if final.exists():
            old = save_dir / f".{tag}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _write_latest(save_dir, tag)
    return final


def _write_latest(save_dir: Path, tag: str) -> None:
    tmp = save_dir / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(tag)
    os.replace(tmp, save_dir / LATEST)


def delete_remote_checkpoint(backend: Backend, tag: str) -> None:
    """Remove <tag> remotely: COMPLETE first, so no reader ever sees a COMPLETE tag with files missing."""
    _check_tag(tag)
    backend.delete(f"{tag}/{COMPLETE}")
    for name in sorted(backend.list(f"{tag}/")):
        backend.delete(name)


def publish_checkpoints(save_dir: Path, backend: Backend, *, workers: int = 8, progress: bool = False) -> SyncResult:
    """Publish every SAVE_DIR/global_step* folder (single node: one part each), oldest first: what `neox-sync
    --checkpoints` runs to finish uploads a training run left unpublished. Already COMPLETE tags cost a listing."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise StorageError(f"{save_dir} is not a folder (expected a checkpoint save dir with global_step* folders)")
    tags = sorted((p.name for p in save_dir.iterdir() if p.is_dir() and _STEP_RE.fullmatch(p.name)), key=step_of)
    if not tags:
        raise StorageError(f"{save_dir} has no global_step* checkpoint folders to publish")
    total = SyncResult()
    started = time.monotonic()
    for tag in tags:
        part = upload_checkpoint_part(save_dir, tag, backend, workers=workers)
        if not finalize_checkpoint(backend, tag, num_nodes=1):
            raise StorageError(f"{backend.url}/{tag}: its part vanished while publishing")  # pragma: no cover
        for field in ("files_uploaded", "files_skipped", "bytes_uploaded", "retries"):
            setattr(total, field, getattr(total, field) + getattr(part, field))
        if progress:
            print(f"neox-sync: published {tag} ({part.files_uploaded} uploaded, {part.files_skipped} skipped)",
                  file=sys.stderr)
    total.seconds = time.monotonic() - started
    return total
