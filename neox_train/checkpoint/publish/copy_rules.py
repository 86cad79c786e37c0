"""What a plain `neox-sync SRC DST` may write: never a checkpoint's shape, never into a run's
prefix.

Checkpoints reach a bucket only through the publication protocol (protocol.py: complete local tags,
verified against their save-time crc32c, manifest, COMPLETE, `latest` forward only, under the
prefix's owner). A plain copy is checked before it uploads anything (check_plain_copy), and each
write is checked again (protect_published) against the listing the copy works from.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local.tags import step_of_tag
from neox_train.checkpoint.publish.owner import OWNER, describe
from neox_train.checkpoint.publish.protocol import (
    COMPLETE,
    LATEST,
    MANIFEST,
    PARTS,
    CheckpointConflict,
)
from neox_train.remote.base import Backend, RemoteFile
from neox_train.remote.rsync import Guard, local_files


def _checkpoint_folders(names: Iterable[str]) -> dict[str, str]:
    """Folders (relative to the listing's root, "" for the root itself) that belong to the
    checkpoint protocol, with what they are: published (COMPLETE), or being published (a manifest or
    node parts, no COMPLETE yet)."""
    out: dict[str, str] = {}
    for name in names:
        folder, _, base = name.rpartition("/")
        if base == OWNER:
            out[folder] = f"owned by a training run (it has {OWNER})"
        elif base == COMPLETE:
            out[folder] = "a published checkpoint (it has COMPLETE)"
        elif base == MANIFEST or folder == PARTS or folder.endswith(f"/{PARTS}"):
            tag_folder = folder.rpartition("/")[0] if base != MANIFEST else folder
            out.setdefault(tag_folder,
                           "a checkpoint being published (it has node parts or a manifest)")
    return out


def _reserved(rel: str, dst_is_tag: bool) -> str:
    """Why a plain copy may not write `rel` (relative to the destination; `dst_is_tag`: the
    destination lies in a tag folder), or "" when it may. Publication names, and anything shaped
    like a checkpoint tag, are written only by the publication protocol."""
    parts = rel.split("/")
    folders, base = parts[:-1], parts[-1]
    if PARTS in folders:
        return f"{PARTS}/ holds the node parts of a checkpoint being published"
    if base in (COMPLETE, LATEST, OWNER):
        return (f"{base} is publication bookkeeping (a checkpoint's marker, the `latest` pointer, "
                "the prefix's owner)")
    if dst_is_tag or any(step_of_tag(f) is not None for f in folders):
        return "it is inside a checkpoint tag folder (global_stepN)"
    return ""


def check_plain_copy(src_dir: Path, backend: Backend,
                     owned_above: dict[str, Any] | None = None) -> None:
    """Before a plain `neox-sync SRC DST` uploads anything: CheckpointConflict (one line) when it
    would write a checkpoint's shape (a tag folder, COMPLETE, manifest, `latest`, the owner object,
    node parts) or write into a prefix a run owns or a checkpoint folder (`owned_above`: the owner
    record found at DST or a folder above it, else None; the folders below DST come from the
    listing). Nothing is uploaded then; protect_published checks each write again."""
    advice = ("checkpoints are published only by `neox-sync --checkpoints SAVE_DIR URL`, which "
              "uploads complete tags whose every file matches its save-time crc32c; a plain "
              "neox-sync copies other files")
    # e.g. .../global_step5/x
    dst_is_tag = any(step_of_tag(part) is not None for part in backend.url.split("/"))
    files = [rel for rel, _ in local_files(Path(src_dir))]
    for rel in files:
        why = _reserved(rel, dst_is_tag)
        if why:
            raise CheckpointConflict(
                f"refusing to copy {Path(src_dir) / rel} to {backend.url}/{rel}: {why}; {advice}")
    if owned_above is not None:
        raise CheckpointConflict(
            f"refusing to write into {backend.url}: it belongs to {describe(owned_above)} (a "
            "training run publishes there) and a plain copy never writes into a run's prefix; copy "
            f"to another prefix ({advice})")
    # the same folders protect_published guards per write
    protected = _checkpoint_folders(backend.list(""))
    for rel in files:
        for folder, what in protected.items():
            if folder == "" or rel.startswith(folder + "/"):
                where = f"{backend.url}/{folder}".rstrip("/")
                raise CheckpointConflict(f"refusing to write {backend.url}/{rel}: {where} is "
                                         f"{what}, and a plain copy never writes into a run's "
                                         f"prefix or a checkpoint; {advice}")


def protect_published(backend: Backend, prefix: str) -> Guard:
    """The rule for `neox-sync SRC DST`: it never writes into a checkpoint folder, nor the `latest`
    pointer or owner object next to them; those change only through the publication protocol
    (`neox-sync --checkpoints`)."""
    lock = threading.Lock()
    seen: dict[str, Any] = {}

    def where(rel: str) -> str:
        return f"{backend.url}/{prefix}{rel}".rstrip("/")

    def rules(listing: dict[str, RemoteFile]) -> tuple[dict[str, str], set[str]]:
        with lock:  # worked out once, from the one listing, by whichever upload thread asks first
            if "protected" not in seen:
                protected = _checkpoint_folders(n[len(prefix):] for n in listing)
                parents = {f.rpartition("/")[0] for f in protected if f}
                seen["protected"] = protected
                seen["reserved"] = {f"{p}/{n}" if p else n
                                    for p in parents for n in (LATEST, OWNER)}
            return seen["protected"], seen["reserved"]

    def guard(rel: str, _have: RemoteFile | None, listing: dict[str, RemoteFile]) -> None:
        protected, reserved = rules(listing)
        for folder, what in protected.items():
            if folder == "" or rel.startswith(folder + "/"):
                raise CheckpointConflict(
                    f"refusing to write {where(rel)}: {where(folder)} is {what}, and published "
                    "checkpoints are never changed (checkpoints are published with neox-sync "
                    "--checkpoints SAVE_DIR URL)")
        if rel in reserved:
            raise CheckpointConflict(
                f"refusing to write {where(rel)}: it is the checkpoint bookkeeping of that prefix "
                f"(moved only by publication: neox-sync --checkpoints SAVE_DIR URL)")

    return guard
