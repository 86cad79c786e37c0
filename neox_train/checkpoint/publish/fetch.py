"""Reading published checkpoints back: which tags are COMPLETE, which one `latest` means, whether a
local tag is exactly what the bucket holds (for retention), and downloading one, verified against
its manifest, into a save dir.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.commit import LATEST
from neox_train.checkpoint.local.tags import sort_key
from neox_train.checkpoint.publish.protocol import (
    COMPLETE,
    MANIFEST,
    check_tag,
    file_entry,
    part_files,
    read_json,
)
from neox_train.checkpoint.publish.settings import PublishSettings
from neox_train.errors import StorageError
from neox_train.remote.base import Backend, RemoteFile
from neox_train.remote.files import Crc32cCache, crc32c_of_file, install_folder
from neox_train.remote.rsync import (
    check_relative,
    first_mismatch,
    hash_local,
    parallel,
    progress_bar,
)


def remote_checkpoints(backend: Backend, listing: dict[str, RemoteFile] | None = None) -> list[str]:
    """Tags with both COMPLETE and a manifest, oldest step first."""
    listing = backend.list("") if listing is None else listing
    tags = [name[: -len(COMPLETE) - 1] for name in listing
            if name.endswith(f"/{COMPLETE}") and name.count("/") == 1]
    return sorted((t for t in tags if f"{t}/{MANIFEST}" in listing), key=sort_key)


def remote_latest(backend: Backend) -> str | None:
    """The tag the `latest` pointer names when it is COMPLETE, else the newest COMPLETE tag, else
    None."""
    pointer = backend.read_bytes(LATEST)
    if pointer is not None:
        tag = pointer.decode("utf-8", "replace").strip()
        try:
            check_tag(tag)
        except StorageError:
            tag = ""
        if tag and all(
                backend.read_bytes(f"{tag}/{name}") is not None for name in (COMPLETE, MANIFEST)):
            return tag
    tags = remote_checkpoints(backend)
    return tags[-1] if tags else None


def remote_manifest(backend: Backend, tag: str) -> dict[str, Any] | None:
    """The manifest of a COMPLETE tag (None when the tag is not COMPLETE)."""
    if backend.read_bytes(f"{tag}/{COMPLETE}") is None:
        return None
    return read_json(backend, f"{tag}/{MANIFEST}")


def verified_remote(backend: Backend, save_dir: Path, tags: Iterable[str], *,
                    node_rank: int = 0) -> list[str]:
    """The local tags whose files, as this node publishes them, are in the bucket under a COMPLETE
    tag exactly as the local marker records them: what local retention may delete, whoever published
    it."""
    listing = backend.list("")
    published = set(remote_checkpoints(backend, listing))
    out = []
    for tag in tags:
        if tag not in published:
            continue
        try:
            status, files = part_files(save_dir, tag, node_rank)
        except StorageError:
            continue
        manifest = read_json(backend, f"{tag}/{MANIFEST}")
        if manifest is None:
            continue
        if status.files is not None:
            local = {rel: (status.files[rel].size, status.files[rel].crc32c) for rel, _ in files}
        else:
            local = hash_local(files, Crc32cCache(), 4)
        remote = {rel: file_entry(meta, f"{backend.url}/{tag}/{MANIFEST}")
                  for rel, meta in manifest["files"].items()}
        if all(remote.get(rel) == entry for rel, entry in local.items()) and \
                first_mismatch(listing, f"{tag}/", {rel: remote[rel] for rel in local}) is None:
            out.append(tag)
    return out


def fetch_checkpoint(backend: Backend, tag: str, save_dir: Path, *, workers: int = 8,
                     progress: bool = False) -> Path:
    """Download COMPLETE checkpoint <tag> to SAVE_DIR/<tag>, verified against its manifest, commit
    it locally (completeness marker from the manifest) and point SAVE_DIR/latest at it. Returns
    SAVE_DIR/<tag>.

    Files go to SAVE_DIR/.<tag>.partial first and are renamed into place only when every one has the
    manifest's size and crc32c and the marker is written, so SAVE_DIR/<tag> is never half there.
    Local files that already match are reused.
    """
    check_tag(tag)
    where = f"{backend.url}/{tag}"
    if backend.read_bytes(f"{tag}/{COMPLETE}") is None:
        complete = remote_checkpoints(backend)
        raise StorageError(
            f"{where} is not a complete checkpoint (no {COMPLETE} marker: its upload never "
            f"finished); complete ones: {', '.join(complete) if complete else 'none'}"
        )
    manifest = read_json(backend, f"{tag}/{MANIFEST}")
    if manifest is None:
        raise StorageError(
            f"{where} has {COMPLETE} but no {MANIFEST}; it is damaged (fetch another tag)")
    files = {rel: file_entry(meta, f"{where}/{MANIFEST}")
             for rel, meta in manifest["files"].items()}
    for rel in files:
        check_relative(rel, f"{where}/{MANIFEST} entry {rel!r}")
    # Fail before downloading gigabytes if the bucket no longer matches the manifest.
    listing = backend.list(f"{tag}/")
    mismatch = first_mismatch(listing, f"{tag}/", files)
    if mismatch:
        rel, found, size, crc = mismatch
        raise StorageError(
            f"{where}/{rel} is {found}, but the manifest says size {size} crc32c {crc}: the remote "
            f"checkpoint is damaged (fetch another tag)"
        )

    save_dir = Path(save_dir)
    final = save_dir / tag
    partial = save_dir / f".{tag}.partial"

    def matches(path: Path, size: int, crc: str) -> bool:
        return path.is_file() and path.stat().st_size == size and crc32c_of_file(path) == crc

    local_ok = {rel for rel, (size, crc) in files.items()
                if matches(final.joinpath(*rel.split("/")), size, crc)}
    if len(local_ok) == len(files) and commit.inspect(save_dir, tag).complete:
        commit.write_latest(save_dir, tag)
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
        with progress_bar(progress, sum(files[rel][0] for rel in todo), f"fetch {tag}") as bar:
            def fetch(rel: str) -> None:
                dest = partial.joinpath(*rel.split("/"))
                # durable, and hashed as the bytes arrived: the file is not read back
                size, crc = files[rel]
                got_crc = backend.download_file(f"{tag}/{rel}", dest, size=size)
                got_size = dest.stat().st_size
                if (got_size, got_crc) != (size, crc):
                    raise StorageError(
                        f"{where}/{rel} downloaded with size {got_size} crc32c {got_crc}, but the "
                        f"manifest says size {size} crc32c {crc}; the checkpoint was not installed"
                    )

            parallel(fetch, todo, workers, lambda rel, _r: bar.update(files[rel][0]))
        commit.write_marker_from_manifest(partial, tag, files, manifest.get("run_id"))
        install_folder(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    commit.write_latest(save_dir, tag)
    return final


def verified_local_tags(backend, settings: PublishSettings) -> list[str]:
    save_dir = Path(settings.save_dir)
    return verified_remote(backend, save_dir, commit.complete_tags(save_dir),
                           node_rank=settings.node_rank)
