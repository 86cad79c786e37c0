"""The trainer's side of checkpoint sync: who publishes, and what local retention may delete.

The trainer calls `Publisher.committed(tag)` right after a tag's local commit (every rank's files durable, the
marker and `latest` written), on every rank; only uploader ranks act. With DeepSpeed's
`checkpoint.use_node_local_storage` each node holds its own part of a checkpoint, so every node's local rank 0
uploads its part and global rank 0 publishes once all parts are remote; on shared storage only global rank 0
uploads. Global rank 0 also claims the prefix for this run (owner.py) before anything is uploaded. The upload
process itself is worker.py; the trainer's handle on it, uploader.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from neox_train.checkpoint.fetch import verified_local_tags
from neox_train.checkpoint.journal import (
    append_journal,
    crc_cache_path,
    journal_leftovers,
    journal_path,
    journal_queued,
)
from neox_train.checkpoint.owner import Identity, check_start, claim
from neox_train.checkpoint.publication import SyncSettings
from neox_train.checkpoint.uploader import SyncStatus, SyncWorker
from neox_train.checkpoint.worker import Publication
from neox_train.config import RunConfig
from neox_train.distributed import Topology
from neox_train.errors import is_transient
from neox_train.log import log
from neox_train.remote import open_backend
from neox_train.remote.base import process_retries
from neox_train.remote.files import Crc32cCache


def node_local_storage(ds_config: dict[str, Any]) -> bool:
    ckpt = ds_config.get("checkpoint")
    return isinstance(ckpt, dict) and bool(ckpt.get("use_node_local_storage", False))


def is_uploader(topo: Topology, node_local: bool) -> bool:
    """The rank that owns this node's copy of a checkpoint: it commits, uploads and deletes it."""
    return topo.local_rank == 0 if node_local else topo.rank == 0


def folder_node(topo: Topology, node_local: bool) -> int:
    """Which checkpoint folder this rank's files are in: its node's with node-local storage, else 0 (one folder
    every node shares). The node-<k> of the journal, the crc32c cache and the uploaded part."""
    return topo.node_rank if node_local else 0


def check_storage_access(run: RunConfig, topo: Topology, node_local: bool) -> None:
    """Prove credentials, bucket and write permission now (probe object written and deleted), not after hours of
    training. Raises StorageError with one line."""
    if run.sync_to is None or not is_uploader(topo, node_local):
        return

    open_backend(run.sync_to, credentials=run.credentials).probe()


def check_prefix_owner(run: RunConfig, topo: Topology, run_id: str, *, takeover: bool) -> None:
    """Before anything expensive, on global rank 0: may this run publish to sync_to? PrefixOwned (one line) if
    another run owns it; the claim itself comes once the checkpoint is loaded (Publisher.claim)."""
    if run.sync_to is None or topo.rank != 0:
        return

    check_start(open_backend(run.sync_to, credentials=run.credentials, start_up=True), run_id, takeover=takeover)


class Publisher:
    def __init__(self, run: RunConfig, topo: Topology, *, node_local: bool, identity: Identity):
        self.run = run
        self.topo = topo
        self.identity = identity
        self.enabled = run.sync_to is not None and is_uploader(topo, node_local)
        self.settings = SyncSettings(
            url=run.sync_to or "",
            save_dir=run.save_dir,
            run_id=identity.run_id,
            session=identity.session,
            credentials=run.credentials,
            node_rank=folder_node(topo, node_local),
            num_nodes=topo.num_nodes if node_local else 1,
            publisher=topo.rank == 0,
            max_pending=run.max_pending_uploads,
            unreachable_warning_s=run.unreachable_warning_s,
        )
        self.worker: SyncWorker | None = None
        self.status = SyncStatus()
        self._inline: Publication | None = None

    def claim(self, *, takeover: bool) -> None:
        """Global rank 0 makes this run the prefix's owner (before any upload). PrefixOwned if another run owns it
        and `takeover` is off."""
        if self.run.sync_to is None or self.topo.rank != 0:
            return

        warning = claim(open_backend(self.run.sync_to, credentials=self.run.credentials, start_up=True),
                        self.identity, takeover=takeover, save_dir=self.run.save_dir)
        if warning:
            log.warning("sync: %s", warning)
        log.info("sync: run %s publishes to %s", self.identity.run_id, self.run.sync_to)

    def start(self) -> None:
        """Start uploading: the background worker, or (inline mode) publish what earlier runs left unpublished."""
        if not self.enabled:
            return
        if self.run.background_upload:
            self.worker = SyncWorker(self.settings)
            self.worker.start()
            return

        backend = open_backend(self.settings.url, credentials=self.settings.credentials)
        cache = Crc32cCache(crc_cache_path(Path(self.run.save_dir), self.settings.node_rank))
        self._inline = Publication(backend, self.settings, cache)
        self.status.published.extend(verified_local_tags(backend, self.settings))
        for tag in journal_leftovers(Path(self.run.save_dir), self.settings.node_rank):
            if tag not in self.status.published:
                self._publish_inline(tag)

    def committed(self, tag: str, *, first: bool = False) -> None:
        """A tag is complete on local disk: hand it to the worker, or upload it now when background is off.
        `first`: upload it before the older tags still queued (the preemption save, inside its budget)."""
        if not self.enabled:
            return
        if self.worker is not None:
            self.worker.submit(tag, first=first)
            return
        journal_queued(Path(self.run.save_dir), self.settings.node_rank, tag)
        self._publish_inline(tag)

    def _publish_inline(self, tag: str) -> None:
        started = time.time()
        self.status.pending.append(tag)
        try:
            result = self._inline.publish(tag, timeout_s=self.run.upload_timeout_s)
        except Exception as e:  # noqa: BLE001 - the same policy as the worker: the checkpoint stays local
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.status.record_failed(tag, error)
            if not is_transient(e):
                append_journal(journal_path(Path(self.run.save_dir), self.settings.node_rank),
                               {"failed": tag, "error": error, "time": time.time()})
            log.error("sync: cannot publish %s to %s inline (it stays on local disk): %s", tag, self.settings.url,
                      error)
            return
        self.status.record_published(tag, lag_s=time.time() - started, bytes_uploaded=result.bytes_uploaded,
                                     files_uploaded=result.files_uploaded, files_skipped=result.files_skipped)
        log.info("sync: published %s to %s inline (%d bytes, %.1f s)", tag, self.settings.url,
                 result.bytes_uploaded, self.status.last_lag_s)

    def hold_uploads(self, saving: bool) -> None:
        """While a save is written (in the loop or in the background), the worker holds its next file: the save
        gets the disk and the cores (bounded by yield_to_save_max_s)."""
        if self.worker is not None:
            self.worker.set_saving(saving)

    def poll(self) -> SyncStatus:
        if self.worker is not None:
            self.status = self.worker.poll()
        return self.status

    def metrics(self) -> dict[str, float]:
        """The sync/* metrics; `retries` counts every retried storage request: the worker's and this process's
        own (start-up probe, ownership checks, inline uploads)."""

        status = self.poll()
        return status.metrics(retries=status.worker_retries + process_retries())

    def may_delete(self, tag: str) -> bool:
        """Local retention deletes a tag only once it is verified remote (or when nothing is synced)."""
        if self.run.sync_to is None:
            return True
        if not self.enabled:
            return False  # this rank cannot know; uploader ranks do the deleting
        return tag in self.poll().published

    def verified_now(self) -> list[str]:
        """Local tags verified in the bucket, asked of the bucket now (what the worker reported may not have
        arrived yet: a restart's first save comes before it). For making room on a full disk, so not on a hot
        path; [] when this rank does not upload or the bucket cannot answer."""
        if not self.enabled:
            return []
        known = list(self.poll().published)
        try:
            backend = open_backend(self.settings.url, credentials=self.settings.credentials, start_up=True)
            known += verified_local_tags(backend, self.settings)
        except Exception as e:  # noqa: BLE001 - a bucket that cannot answer: nothing more is deleted
            log.warning("sync: cannot check which local checkpoints are in %s: %s", self.settings.url, e)
        return known

    def abort(self) -> None:
        """Training failed: stop the worker without flushing (the journal keeps what is unpublished)."""
        if self.worker is not None:
            self.worker.kill()

    def close(self, timeout_s: float | None = None, *, cutoff=None) -> SyncStatus:
        """Flush with a bounded wait (upload_timeout_s unless told, and `cutoff`: see SyncWorker.close); the status
        lists what is still unpublished."""
        if self.worker is not None:
            timeout_s = self.run.upload_timeout_s if timeout_s is None else timeout_s
            pending = len(self.worker.poll().pending)
            if pending:
                log.info("sync: waiting up to %.0f s for %d pending upload(s) to %s", timeout_s, pending,
                         self.settings.url)
            self.status = self.worker.close(timeout_s, cutoff=cutoff)
            if self.status.unpublished and cutoff is not None and cutoff() is not None:
                log.warning("sync: stopped by a signal during the upload flush: %s not published to %s (journaled: "
                            "the next start, or neox-sync --checkpoints, publishes them)",
                            ", ".join(self.status.unpublished), self.settings.url)
        return self.status
