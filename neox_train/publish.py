"""Who publishes checkpoints, how, and what local retention may delete.

The trainer calls `committed(tag)` right after `save_checkpoint` returned (every rank's files are on disk), on
every rank; only uploader ranks act. With DeepSpeed's `checkpoint.use_node_local_storage` each node holds its
own part of a checkpoint, so every node's local rank 0 uploads its part and global rank 0 publishes once all
parts are remote; on shared storage only global rank 0 uploads.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import RunConfig
from .metrics import log
from .sync_worker import SyncSettings, SyncStatus, SyncWorker, append_journal, journal_path, publish_tag


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    node_rank: int
    num_nodes: int

    @classmethod
    def from_env(cls) -> "Topology":
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "0")) or 0)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # DeepSpeed's launcher exports CROSS_RANK/CROSS_SIZE (node index/count); derive them otherwise.
        node_rank = int(os.environ.get("CROSS_RANK", rank // local_size if local_size else 0))
        num_nodes = int(os.environ.get("CROSS_SIZE", world // local_size if local_size else 1))
        return cls(rank, local_rank, node_rank, max(num_nodes, 1))


def node_local_storage(ds_config: dict[str, Any]) -> bool:
    ckpt = ds_config.get("checkpoint")
    return isinstance(ckpt, dict) and bool(ckpt.get("use_node_local_storage", False))


def is_uploader(topo: Topology, node_local: bool) -> bool:
    return topo.local_rank == 0 if node_local else topo.rank == 0


def check_storage_access(run: RunConfig, topo: Topology, node_local: bool) -> None:
    """Prove credentials, bucket and write permission now (probe object written and deleted), not after hours of
    training. Raises StorageError with one line."""
    if run.sync_to is None or not is_uploader(topo, node_local):
        return
    from .storage import open_backend

    open_backend(run.sync_to, credentials=run.credentials).probe()


class Publisher:
    def __init__(self, run: RunConfig, topo: Topology, *, node_local: bool, run_id: str | None = None):
        self.run = run
        self.enabled = run.sync_to is not None and is_uploader(topo, node_local)
        self.settings = SyncSettings(
            url=run.sync_to or "",
            save_dir=run.save_dir,
            credentials=run.credentials,
            node_rank=topo.node_rank if node_local else 0,
            num_nodes=topo.num_nodes if node_local else 1,
            publisher=topo.rank == 0,
            max_pending=run.max_pending_uploads,
            run_id=run_id,
        )
        self.worker: SyncWorker | None = None
        self.status = SyncStatus()
        self._backend = None
        self._cache = None
        if not self.enabled:
            return
        if run.background_upload:
            self.worker = SyncWorker(self.settings)
            self.worker.start()
        else:
            from .storage import Crc32cCache, open_backend
            from .sync_worker import JOURNAL_DIR

            self._backend = open_backend(self.settings.url, credentials=self.settings.credentials)
            self._cache = Crc32cCache(Path(run.save_dir) / JOURNAL_DIR / f"crc32c-node{self.settings.node_rank}.json")

    def committed(self, tag: str) -> None:
        """A tag is complete on local disk: hand it to the worker, or upload it now when background is off."""
        if not self.enabled:
            return
        if self.worker is not None:
            self.worker.submit(tag)
            return
        started = time.time()
        append_journal(journal_path(Path(self.run.save_dir), self.settings.node_rank), {"queued": tag, "time": started})
        result = publish_tag(self._backend, self.settings, tag, self._cache)
        self.status.record_published(tag, lag_s=time.time() - started, bytes_uploaded=result.bytes_uploaded,
                                     files_uploaded=result.files_uploaded, files_skipped=result.files_skipped,
                                     retries=result.retries)
        log.info("sync: published %s to %s inline (%d bytes, %.1f s)", tag, self.settings.url,
                 result.bytes_uploaded, self.status.last_lag_s)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Around engine.save_checkpoint: the background worker holds its uploads until the save is written."""
        if self.worker is not None:
            self.worker.set_saving(True)
        try:
            yield
        finally:
            if self.worker is not None:
                self.worker.set_saving(False)

    def poll(self) -> SyncStatus:
        if self.worker is not None:
            self.status = self.worker.poll()
        return self.status

    def may_delete(self, tag: str) -> bool:
        """Local retention deletes a tag only once it is verified remote (or when nothing is synced)."""
        if self.run.sync_to is None:
            return True
        if not self.enabled:
            return False  # this rank cannot know; uploader ranks do the deleting
        return tag in self.poll().published

    def abort(self) -> None:
        """Training failed: stop the worker without flushing (the journal keeps what is unpublished)."""
        if self.worker is not None:
            self.worker.kill()

    def close(self) -> SyncStatus:
        """Flush with a bounded wait; the returned status lists what is still unpublished."""
        if self.worker is not None:
            pending = len(self.worker.poll().pending)
            if pending:
                log.info("sync: waiting up to %.0f s for %d pending upload(s) to %s", self.run.upload_timeout_s,
                         pending, self.settings.url)
            self.status = self.worker.close(self.run.upload_timeout_s)
        return self.status
