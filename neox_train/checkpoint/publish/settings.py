"""Who publishes a run's checkpoints, and with what settings: the one place that turns a run config
and a rank's place in the job into `PublishSettings`.

With DeepSpeed's `checkpoint.use_node_local_storage` each node holds its own part of a checkpoint,
so every node's local rank 0 uploads its part and global rank 0 publishes once all parts are remote;
on shared storage only global rank 0 uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neox_train.checkpoint.publish.journal import journal_path
from neox_train.config import DEFAULT_TRANSFER_STREAMS, RunConfig
from neox_train.distributed import Topology
from neox_train.remote import open_backend
from neox_train.remote.base import Backend


def node_local_storage(ds_config: dict[str, Any]) -> bool:
    ckpt = ds_config.get("checkpoint")
    return isinstance(ckpt, dict) and bool(ckpt.get("use_node_local_storage", False))


def is_publishing_rank(topo: Topology, node_local: bool) -> bool:
    """The rank that owns this node's copy of a checkpoint: it commits, uploads and deletes it."""
    return topo.local_rank == 0 if node_local else topo.rank == 0


def folder_node(topo: Topology, node_local: bool) -> int:
    """Which checkpoint folder this rank's files are in: its node's with node-local storage, else 0
    (one folder every node shares). The node-<k> of the journal, the crc32c cache and the uploaded
    part."""
    return topo.node_rank if node_local else 0


@dataclass(frozen=True)
class PublishSettings:
    """What publishing needs; plain data so it crosses the spawn boundary into the upload
    process."""

    url: str
    save_dir: str
    # this run's id and this start's session: the worker publishes only while they own the prefix
    run_id: str
    session: str | None = None
    credentials: str | None = None
    node_rank: int = 0
    num_nodes: int = 1  # nodes whose parts make one checkpoint (node-local storage), else 1
    finalizes: bool = True  # writes manifest, COMPLETE, latest: global rank 0's upload process
    # the stream budget of the upload process (files and their parts), RunConfig.transfer_streams
    streams: int = DEFAULT_TRANSFER_STREAMS
    parallel_uploads: bool = True
    # >0: when more are waiting, superseded pending tags are skipped (kept locally)
    max_pending: int = 0
    retry_initial_s: float = 2.0
    retry_max_s: float = 60.0
    finalize_poll_s: float = 1.0
    # A checkpoint waits this long for the other nodes' parts (or, on those nodes, for node 0's
    # COMPLETE) before it is given up as failed; meanwhile the worker goes on with the next
    # checkpoints.
    await_other_nodes_s: float = 3600.0
    # While the trainer writes a checkpoint, uploads wait (at most this long per wait) so that they
    # do not compete with the save for the disk and the cores: the loop's stall is the one cost that
    # reaches the GPUs.
    yield_to_save_max_s: float = 120.0
    # Requests failing this long with none getting through (a refused or silent endpoint): one
    # WARNING, and the waiting checkpoints count as stuck for max_unpublished_checkpoints
    # (RunConfig.unreachable_warning_s).
    unreachable_warning_s: float = 30.0
    # upload in a process of its own; False: inside save, blocking (debugging)
    background: bool = True
    # the bounded wait at exit (flush) and for an inline publication
    upload_timeout_s: float = 1800.0

    @classmethod
    def for_run(cls, run: RunConfig, topo: Topology, *, node_local: bool, run_id: str,
                session: str | None) -> PublishSettings:
        return cls(
            url=run.sync_to or "",
            save_dir=run.save_dir,
            run_id=run_id,
            session=session,
            credentials=run.credentials,
            node_rank=folder_node(topo, node_local),
            num_nodes=topo.num_nodes if node_local else 1,
            finalizes=topo.rank == 0,
            max_pending=run.max_pending_uploads,
            streams=run.transfer_streams,
            parallel_uploads=run.parallel_uploads,
            unreachable_warning_s=run.unreachable_warning_s,
            background=run.background_upload,
            upload_timeout_s=run.upload_timeout_s,
        )

    def open_backend(self, *, start_up: bool = False) -> Backend:
        """The bucket, with this run's stream budget; parallel uploads record their parts in this
        node's journal, so the next run of this save dir deletes what a killed one left."""
        return open_backend(self.url, credentials=self.credentials, start_up=start_up,
                            streams=self.streams, parallel_uploads=self.parallel_uploads,
                            parts_journal=journal_path(Path(self.save_dir), self.node_rank))
