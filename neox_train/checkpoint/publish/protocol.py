"""Checkpoint publication to a bucket prefix, and fetching back: the protocol on top of rsync.

A published checkpoint, relative to the backend root:

    .neox-owner.json            the run (and session) that publishes under this prefix (owner.py)
    <tag>/...files...           the same relative paths as SAVE_DIR/<tag>/ (minus the local marker)
    <tag>/.parts/node-<k>.json  what node k uploaded: {"node", "run_id", "session", "files":
                                {relpath: {size, crc32c}}}
    <tag>/manifest.json         the merged parts: {"tag", "step", "run_id", "num_nodes", "files"}
    <tag>/COMPLETE              {"tag", "step", "run_id"}: written last, only after a listing
                                matched the manifest
    latest                      the bare tag (DeepSpeed's format); moved after COMPLETE, and only
                                forward

So a reader that sees COMPLETE can trust the manifest, and every manifest file is there with its
crc32c; a reader that sees no COMPLETE ignores the tag, whatever else is there. Nothing under a tag
with COMPLETE is ever written or deleted again by any command here: a plain `neox-sync` writes no
checkpoint shape and nothing into a run's prefix (copy_rules.py), and a publisher writes into a tag
only while it owns the prefix and the tag has no COMPLETE (checked again right before each
replacement and before the marker). Only locally complete tags (commit.py) are ever uploaded.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.tags import (
    CONFIG_JSON,
    DATA_SIDE_FILES,
    RUN_JSON,
    sort_key,
    step_of_tag,
)
from neox_train.checkpoint.publish.journal import journal_published
from neox_train.checkpoint.publish.owner import Identity, fence
from neox_train.checkpoint.publish.settings import PublishSettings
from neox_train.errors import StorageError
from neox_train.remote.base import Backend, RemoteChanged, RemoteFile
from neox_train.remote.files import Crc32cCache
from neox_train.remote.rsync import (
    SyncResult,
    first_mismatch,
    hash_local,
    upload_tree,
)

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
LATEST = "latest"
PARTS = ".parts"
_LATEST_ATTEMPTS = 5


class CheckpointConflict(StorageError):
    """A write would change a published (COMPLETE) checkpoint, or a tag another run is publishing.
    Permanent: retrying cannot help. Published checkpoints are immutable, so the local one stays
    local."""


class CheckpointIncomplete(StorageError):
    """A local tag is not a complete checkpoint (no or a damaged completeness marker): it is never
    published."""


def check_tag(tag: str) -> None:
    if not tag or "/" in tag or "\\" in tag or tag.startswith(".") or tag == LATEST:
        raise StorageError(
            f"checkpoint tag {tag!r} is not a plain folder name (valid: e.g. global_step100)")


def read_json(backend: Backend, name: str) -> dict[str, Any] | None:
    raw = backend.read_bytes(name)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StorageError(f"{backend.url}/{name} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise StorageError(
            f"{backend.url}/{name} has no \"files\" object (it was not written by neox-train)")
    return data


def file_entry(meta: Any, where: str) -> tuple[int, str]:
    try:
        return int(meta["size"]), str(meta["crc32c"])
    except (TypeError, KeyError, ValueError) as e:
        raise StorageError(
            f"{where}: entry {meta!r} lacks an integer \"size\" and a \"crc32c\"") from e


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# Files every node's local rank 0 writes under `checkpoint.use_node_local_storage`: the (ZeRO-0/1/2)
# model states and our side files. The same content on every node, but pickles are not
# byte-identical: node 0's copy is the checkpoint's, the others stay local, or two nodes would race
# for one object name with different bytes. (ZeRO-3 names its per-rank files zero_pp_rank_N_...,
# which do not match.)
_SIDE_FILES = "|".join(re.escape(n) for n in (RUN_JSON, CONFIG_JSON, *DATA_SIDE_FILES))
NODE_REPLICATED = re.compile(rf"^(mp_rank_\d+_model_states\.pt|{_SIDE_FILES})$")


def part_files(save_dir: Path, tag: str,
               node_rank: int) -> tuple[commit.TagStatus, list[tuple[str, Path]]]:
    """The local tag's status and the files of it this node publishes. CheckpointIncomplete unless
    complete."""
    folder = Path(save_dir) / tag
    status = commit.inspect(save_dir, tag)
    if not status.complete:
        raise CheckpointIncomplete(f"{folder} is not a complete checkpoint ({status.problem}): "
                                   f"only complete checkpoints are published")
    files = commit.tag_files(folder)
    for rel, path in files:
        if rel in (MANIFEST, COMPLETE) or rel.startswith(f"{PARTS}/"):
            raise StorageError(
                f"{path}: {rel!r} is a name reserved for the published checkpoint's bookkeeping; "
                "rename it")
    if node_rank > 0:
        files = [(rel, path) for rel, path in files if not NODE_REPLICATED.match(rel)]
    return status, files


def _check_against_marker(folder: Path, records: dict[str, commit.FileRecord],
                          cache: Crc32cCache) -> None:
    """A file unchanged since the commit hashed it (same size and mtime) is taken at the marker's
    crc32c; one that was touched since is read again and must still hash to it: a tag is published
    only as it was saved."""
    for rel, record in sorted(records.items()):
        path = folder.joinpath(*rel.split("/"))
        try:
            st = path.stat()
            if record.mtime_ns and (st.st_size, st.st_mtime_ns) == (record.size, record.mtime_ns):
                cache.put(path, (record.size, record.mtime_ns), record.crc32c)
                continue
            crc = cache.get(path)
        except OSError as e:
            raise CheckpointIncomplete(f"{path} cannot be read ({e.strerror or e}): {folder.name} "
                                       f"is not published") from e
        if crc != record.crc32c:
            raise CheckpointIncomplete(
                f"{path} has crc32c {crc} but was saved with {record.crc32c} (its completeness "
                f"marker): the file changed after the save, so {folder.name} is damaged and is "
                "never published; it stays on local disk")


def upload_checkpoint_part(save_dir: Path, tag: str, backend: Backend, *, identity: Identity,
                           node_rank: int = 0, workers: int = 8, cache: Crc32cCache | None = None,
                           gate: Callable[[], None] | None = None) -> SyncResult:
    """Upload this node's files of the complete local tag SAVE_DIR/<tag> to <tag>/ and record them
    in <tag>/.parts/node-<node_rank>.json.

    A tag that is COMPLETE remotely is never written: identical local files are a no-op, different
    ones a CheckpointConflict. A tag another run has parts in is never written either
    (CheckpointConflict). Replacing a file (left by an earlier, interrupted attempt of this run)
    happens only while `identity` still owns the prefix and the tag is still not COMPLETE, checked
    right before each replacement.
    """
    check_tag(tag)
    status, files = part_files(save_dir, tag, node_rank)
    folder = Path(save_dir) / tag
    cache = cache if cache is not None else Crc32cCache()
    if status.files:  # the local commit hashed every file: no need to read them again
        _check_against_marker(folder, status.files, cache)
    listing = backend.list(f"{tag}/")
    if f"{tag}/{COMPLETE}" in listing:
        return _check_already_published(folder, files, backend, tag, cache, workers)
    for name in sorted(n for n in listing if n.startswith(f"{tag}/{PARTS}/")):
        part = read_json(backend, name)
        if part is not None and part.get("run_id") != identity.run_id:
            raise CheckpointConflict(
                f"{backend.url}/{tag} is being published by run {part.get('run_id')} ({name} is "
                f"its part), not by this run ({identity.run_id}); a tag has one publisher: this "
                "checkpoint stays local")

    def guard(rel: str, have: RemoteFile | None,
              _listing: dict[str, RemoteFile] | None = None) -> None:
        if have is None:
            return  # a create-only write cannot harm anyone
        fence(backend, identity, f"replace {tag}/{rel}")
        _not_published(backend, tag)

    result, local = upload_tree(folder, backend, tag, workers=workers, cache=cache, progress=False,
                                gate=gate, files=files, listing=listing, guard=guard)
    part = {
        "node": node_rank,
        "run_id": identity.run_id,
        "session": identity.session,
        "files": {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in sorted(local.items())},
    }
    rel = f"{PARTS}/node-{node_rank}.json"
    _write_once(backend, f"{tag}/{rel}", _dumps(part), listed=f"{tag}/{rel}" in listing,
                before_replace=lambda: guard(rel, listing[f"{tag}/{rel}"]))
    return result


def _check_already_published(folder: Path, files: list[tuple[str, Path]], backend: Backend,
                             tag: str, cache: Crc32cCache, workers: int) -> SyncResult:
    manifest = read_json(backend, f"{tag}/{MANIFEST}")
    if manifest is None:
        raise CheckpointConflict(f"{backend.url}/{tag} has {COMPLETE} but no {MANIFEST}; it is "
                                 f"damaged, and this checkpoint cannot be published under its name")
    local = hash_local(files, cache, workers)
    for rel, (size, crc) in sorted(local.items()):
        meta = manifest["files"].get(rel)
        if meta is None or file_entry(meta, f"{backend.url}/{tag}/{MANIFEST}") != (size, crc):
            raise CheckpointConflict(
                f"{backend.url}/{tag} is already published (COMPLETE) with different content "
                f"({folder / rel} is {'not in its manifest' if meta is None else 'different'}); a "
                f"published checkpoint is never overwritten: this one stays local"
            )
    return SyncResult(files_skipped=len(local))


def finalize_checkpoint(backend: Backend, tag: str, *, identity: Identity,
                        num_nodes: int = 1) -> bool:
    """Publish <tag> once every node's part is there: manifest, then COMPLETE, then `latest`
    (forward only).

    False: some part is missing, or is left from an earlier start of this run (its node uploads this
    start's; poll again). True: the tag is COMPLETE. Idempotent: on a COMPLETE tag only `latest` may
    move (forward). A part of another run is a CheckpointConflict; a file the parts list but the
    bucket lacks or holds with another size or crc32c is a StorageError, and nothing is published.
    `identity` must still own the prefix right before the manifest and again right before the
    COMPLETE marker (PrefixOwned otherwise).
    """
    check_tag(tag)
    if num_nodes < 1:
        raise StorageError(f"finalize {tag}: num_nodes={num_nodes} (valid: 1 or more)")
    listing = backend.list(f"{tag}/")
    if f"{tag}/{COMPLETE}" in listing:
        _advance_latest(backend, tag)
        return True
    part_names = [f"{tag}/{PARTS}/node-{k}.json" for k in range(num_nodes)]
    if any(name not in listing for name in part_names):
        return False

    files: dict[str, tuple[int, str]] = {}
    for name in part_names:
        part = read_json(backend, name)
        if part is None:  # deleted since the listing
            return False
        if part.get("run_id") != identity.run_id:
            raise CheckpointConflict(f"cannot finalize {backend.url}/{tag}: {name} belongs to run "
                                     f"{part.get('run_id')}, not this run ({identity.run_id})")
        if identity.session is not None and part.get("session") != identity.session:
            return False  # left by an earlier start of this run: its node uploads this start's part
        for rel, meta in part["files"].items():
            entry = file_entry(meta, f"{backend.url}/{name}")
            if files.setdefault(rel, entry) != entry:
                raise StorageError(
                    f"cannot finalize {backend.url}/{tag}: two nodes uploaded {rel} with different "
                    "content")

    mismatch = first_mismatch(listing, f"{tag}/", files)
    if mismatch:
        rel, found, size, crc = mismatch
        raise StorageError(
            f"cannot finalize {backend.url}/{tag}: {rel} is {found} remotely, its node uploaded "
            f"size {size} crc32c {crc}", transient=True)
    # Deterministic content (no timestamps): a finalize repeated after a lost response writes the
    # same bytes.
    manifest = {
        "tag": tag,
        "step": step_of_tag(tag),
        "run_id": identity.run_id,
        "num_nodes": num_nodes,
        "files": {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in sorted(files.items())},
    }
    fence(backend, identity, f"publish {tag}")
    _write_once(backend, f"{tag}/{MANIFEST}", _dumps(manifest),
                listed=f"{tag}/{MANIFEST}" in listing,
                before_replace=lambda: _not_published(backend, tag))
    fence(backend, identity, f"publish {tag}")  # right before the irreversible marker
    backend.write_bytes(f"{tag}/{COMPLETE}",
                        _dumps({"tag": tag, "step": step_of_tag(tag), "run_id": identity.run_id}),
                        generation=0)
    _advance_latest(backend, tag)
    return True


def _write_once(backend: Backend, name: str, data: bytes, *, listed: bool,
                before_replace: Callable[[], None]) -> None:
    """A manifest or node part, written once: created if the listing showed none; left alone when it
    already holds these bytes (another publisher of the same run and tag got there first, or an
    earlier attempt's response was lost); replaced only when it differs (an interrupted earlier
    start's), after `before_replace` (the fence and the COMPLETE check) let it."""
    if not listed:
        # a create; the same bytes already there count as written
        backend.write_bytes(name, data, generation=0)
        return
    got = backend.read(name)
    if got is not None and got[0] == data:
        return
    before_replace()
    backend.write_bytes(name, data, generation=0 if got is None else got[1])


def _not_published(backend: Backend, tag: str) -> None:
    if backend.stat(f"{tag}/{COMPLETE}") is not None:
        raise CheckpointConflict(
            f"{backend.url}/{tag} was published meanwhile: its files are never replaced")


def _advance_latest(backend: Backend, tag: str) -> None:
    """Move `latest` to tag if that is forward, replacing exactly the pointer read (never a newer
    one)."""
    for _ in range(_LATEST_ATTEMPTS):
        got = backend.read(LATEST)
        generation = 0
        if got is not None:
            current = got[0].decode("utf-8", "replace").strip()
            if current == tag or sort_key(current) >= sort_key(tag):
                return
            generation = got[1]
        try:
            backend.write_bytes(LATEST, tag.encode(), generation=generation)
            return
        except RemoteChanged:
            continue  # moved by another publisher meanwhile: look again
    raise StorageError(f"{backend.url}/{LATEST} kept changing while {tag} was published",
                       transient=True)


class Publication:
    """The steps of publishing one tag from this node, shared by the background worker and inline
    uploads."""

    def __init__(self, backend, settings: PublishSettings, cache, *, gate=None):
        self.backend = backend
        self.settings = settings
        self.cache = cache
        self.gate = gate
        self.identity = Identity(settings.run_id, settings.session)

    def upload(self, tag: str):
        """This node's part of `tag`; returns the SyncResult."""

        try:
            if not (Path(self.settings.save_dir) / tag).is_dir():
                raise StorageError(f"checkpoint folder {Path(self.settings.save_dir) / tag} "
                                   f"disappeared before it was uploaded")
            result = upload_checkpoint_part(Path(self.settings.save_dir), tag, self.backend,
                                            identity=self.identity,
                                            node_rank=self.settings.node_rank,
                                            workers=self.settings.streams, cache=self.cache,
                                            gate=self.gate)
        except Exception:
            # Deleted locally (before or while it was read) because it is verified in the bucket:
            # retention, or room made for a save on a full disk, while it waited in the queue.
            # Published, not failed.
            if self._gone_because_published(tag):
                return SyncResult()
            raise
        self.cache.save()
        return result

    def _gone_because_published(self, tag: str) -> bool:
        """The local folder is gone and the bucket has the tag COMPLETE (False when the bucket
        cannot say)."""
        if (Path(self.settings.save_dir) / tag).is_dir():
            return False
        try:
            return self.backend.stat(f"{tag}/{COMPLETE}") is not None
        except Exception:  # noqa: BLE001 - the bucket cannot say: the upload's own failure stands
            return False

    def try_complete(self, tag: str) -> bool:
        """The publisher finalizes once every node's part is remote; other nodes see whether
        COMPLETE exists. True once the tag is published."""

        if self.settings.finalizes:
            return finalize_checkpoint(self.backend, tag, identity=self.identity,
                                       num_nodes=self.settings.num_nodes)
        return self.backend.read_bytes(f"{tag}/{COMPLETE}") is not None

    def publish(self, tag: str, *, timeout_s: float):
        """Upload and wait (bounded) until published: the inline path. Returns the SyncResult."""

        result = self.upload(tag)
        deadline = time.monotonic() + timeout_s
        while not self.try_complete(tag):
            if time.monotonic() > deadline:
                raise StorageError(
                    f"{tag}: the other nodes' parts did not arrive within {timeout_s:.0f} s")
            time.sleep(self.settings.finalize_poll_s)
        journal_published(Path(self.settings.save_dir), self.settings.node_rank, tag)
        return result
