"""One function builds a training session, for `neox-train`, bench/ and tests alike: config -> plan
-> checks -> process group -> resume -> engine and trainer -> prefix claim -> publisher. Nothing
else starts a Trainer.

Everything that can reject the input runs first (configs, resume point, bucket access and ownership,
data), so a bad start costs seconds and writes nothing; then the process group, the resume's
verification and identity, the engine, the claim and the upload process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import deepspeed.comm as dist
import torch
from deepspeed.utils import logger as ds_logger

from neox_train import health
from neox_train.checkpoint.local.lock import (
    RESTART_WAIT_S,
    WAIT_S,
    SaveDirLock,
    check_free,
    lock_save_dir,
)
from neox_train.checkpoint.publish.owner import new_id
from neox_train.checkpoint.publish.publisher import (
    Publisher,
    check_prefix_owner,
    check_storage_access,
)
from neox_train.checkpoint.publish.settings import is_publishing_rank, node_local_storage
from neox_train.checkpoint.resume import (
    after_resume_load,
    check_resume_point,
    finish_resume,
    locate_resume,
    remote_run_id,
)
from neox_train.config import RunConfig
from neox_train.distributed import Topology, init_distributed, world_size_from_env
from neox_train.log import log, setup_logging
from neox_train.track.trackers import check_installed
from neox_train.train.plan import RunPlan, load_data, prepare_run
from neox_train.train.trainer import Trainer
from neox_train.train.watchdog import Watchdog

SECOND_RUN = ("a second run there would overwrite its checkpoints and take its bucket prefix: wait "
              "for it to finish, stop it (Ctrl-C saves and exits), or use another --save-dir")


@dataclass
class Session:
    """A started run: its trainer (the loop), the publisher of its checkpoints, and the save dir's
    lock."""

    plan: RunPlan
    topo: Topology
    trainer: Trainer
    publisher: Publisher
    lock: SaveDirLock | None

    def close(self, *, failed: bool = False) -> None:
        """After `trainer.train()` (final or not): stop the loader and metrics, flush the uploads
        (bounded), drop the lock. `failed`: the run raised; the upload process is stopped without a
        flush (the journal keeps what is unpublished) and a save dir this start created and left
        empty is removed."""
        try:
            if failed:
                self.publisher.abort()
            else:
                try:
                    self.trainer.close()
                finally:
                    self._close_publisher()
        finally:
            if self.lock is not None:
                self.lock.release(failed_start=failed)

    def _close_publisher(self) -> None:
        # The upload process ignores SIGTERM: one left running would hold the exit (multiprocessing
        # joins its children without a timeout), so a flush that fails stops it at once.
        try:
            self.publisher.close()
        except BaseException:
            self.publisher.abort()
            raise


def start_session(run: RunConfig, *, resume: str | None = None, takeover: bool = False,
                  watchdog: Watchdog | None = None) -> Session:
    """Check, build and start a run; every rank calls it. Raises NeoxError subclasses with one line
    for bad input; what it started is stopped again when it fails."""
    check_installed(run.trackers())
    plan = prepare_run(run, dp_size=world_size_from_env(), on_gpu=torch.cuda.is_available())
    topo = Topology.from_env()
    node_local = node_local_storage(plan.ds_config)
    setup_logging(Path(run.log_dir), rank=topo.rank)
    quiet_deepspeed()
    # Everything that can reject the input runs before process groups, model and engine exist.
    point = locate_resume(run, resume)
    owns_folder = is_publishing_rank(topo, node_local)
    if owns_folder:
        # a second launch: refused before the data and the bucket
        check_free(run.save_dir, why=SECOND_RUN)
    check_storage_access(run, topo, node_local)
    if run.sync_to and topo.rank == 0:
        inherited = point.run_id or (remote_run_id(point.remote, run.credentials)
                                     if point.remote_only else None)
        check_prefix_owner(run, topo, inherited or new_id(), takeover=takeover)
    data = load_data(plan)
    check_resume_point(plan, point, data[0].num_tokens)
    # Before the prefix is claimed or a file written: one live process per save dir (a second launch
    # is refused).
    restarted = health.attempt() > 0  # the supervisor's previous attempt may still be going down
    lock = (lock_save_dir(run.save_dir, why=SECOND_RUN,
                          wait_s=RESTART_WAIT_S if restarted else WAIT_S)
            if owns_folder else None)
    publisher = trainer = None
    try:
        init_distributed(timeout_s=watchdog.limits.collective_s if watchdog else None)
        if topo.rank == 0 and watchdog:
            log.info("watchdog: %s", watchdog.limits.describe())
        # Verification, downloads from the bucket and universal-checkpoint conversion need the
        # process group (the other ranks wait); so does agreeing on the run's identity.
        plan, resume_tag, identity = finish_resume(plan, point, data[0].num_tokens, topo=topo,
                                                   node_local=node_local)
        publisher = Publisher.for_run(run, topo, node_local=node_local, identity=identity)
        trainer = Trainer(plan, data, resume_tag=resume_tag, topo=topo, publisher=publisher,
                          watchdog=watchdog)
        if topo.rank == 0:
            record_restart(trainer.metrics, trainer.step)
        after_resume_load(plan, resume_tag, topo=topo, node_local=node_local)
        if topo.rank == 0:
            # Only now that the start succeeded: a start that failed leaves SAVE_DIR as it was.
            write_run_files(plan)
            log.info("run %s: effective run config: %s", identity.run_id,
                     json.dumps(plan.run.to_dict()))
            log.info("effective DeepSpeed config (%s): %s", plan.ds_config_path,
                     json.dumps(plan.ds_config))
            for note in plan.ds_notes:
                log.info("DeepSpeed config change: %s", note)
        publisher.claim(takeover=takeover)
        if run.sync_to and plan.dp_size > 1:
            # every node's upload process starts after the claim: its fences see this session
            dist.barrier()
        publisher.start()
    except BaseException:
        if trainer is not None:
            trainer.close(failed=True)  # its loader thread, metrics files and tracker runs
        if publisher is not None:
            publisher.abort()
        if lock is not None:
            lock.release(failed_start=True)
        raise
    return Session(plan=plan, topo=topo, trainer=trainer, publisher=publisher, lock=lock)


def write_run_files(plan: RunPlan) -> None:
    """The effective configs next to the checkpoints, so a run folder says how it was trained."""
    save_dir = Path(plan.run.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "run_config.json").write_text(json.dumps(plan.run.to_dict(), indent=2) + "\n")
    (save_dir / "ds_config.json").write_text(json.dumps(plan.ds_config, indent=2) + "\n")


def record_restart(metrics, start_step: int) -> None:
    """Under the supervisor, after a restart: run/restarts and run/steps_lost (all restarts so far)
    at the step resumed from, and one WARNING line."""
    restarts = int(os.environ.get(health.RESTARTS_ENV, "0") or 0)
    if not restarts:
        return
    reached = int(os.environ.get(health.PREVIOUS_STEP_ENV, "0") or 0)
    lost = max(0, reached - start_step)
    total = int(os.environ.get(health.STEPS_LOST_ENV, "0") or 0) + lost
    metrics.record(start_step, "run", {"restarts": restarts, "steps_lost": total}, catch_up=True)
    log.warning("restart %d: resumed at step %d; the previous start reached step %d, so %d step(s) "
                "are trained again (%d over all restarts)", restarts, start_step, reached, lost,
                total)


def quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every op build at INFO; ours says what matters."""

    level = os.environ.get("NEOX_DEEPSPEED_LOG_LEVEL", "WARNING").upper()

    ds_logger.setLevel(getattr(logging, level, logging.WARNING))
