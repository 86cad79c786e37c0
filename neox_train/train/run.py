"""`neox-train` after its flags are parsed: the order in which a run is checked, started, trained and reported.

Everything that can reject the input runs first (configs, resume point, bucket access and ownership, data), then
the process group, the resume's verification and identity, the engine, the prefix claim, the upload worker, and
the loop; a run that could not publish its checkpoints raises UnpublishedCheckpoints at the end.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch
from deepspeed.utils import logger as ds_logger

from neox_train import health
from neox_train.checkpoint import commit
from neox_train.checkpoint import resume as resume_mod
from neox_train.checkpoint.lock import RESTART_WAIT_S, WAIT_S, check_free, lock_save_dir
from neox_train.checkpoint.owner import new_id
from neox_train.checkpoint.publisher import (
    Publisher,
    check_prefix_owner,
    check_storage_access,
    is_uploader,
    node_local_storage,
)
from neox_train.config import RunConfig
from neox_train.distributed import Topology, adopt_rank_env, init_distributed, world_size_from_env
from neox_train.errors import NeoxError, UnpublishedCheckpoints, one_line
from neox_train.log import log, setup_logging
from neox_train.train.plan import RunPlan, load_data, prepare_run
from neox_train.train.trainer import Trainer
from neox_train.train.watchdog import HangLimits, Watchdog

SECOND_RUN = ("a second run there would overwrite its checkpoints and take its bucket prefix: wait for it to finish, "
              "stop it (Ctrl-C saves and exits), or use another --save-dir")


def write_run_files(plan: RunPlan) -> None:
    """The effective configs next to the checkpoints, so a run folder says how it was trained."""
    save_dir = Path(plan.run.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "run_config.json").write_text(json.dumps(plan.run.to_dict(), indent=2) + "\n")
    (save_dir / "ds_config.json").write_text(json.dumps(plan.ds_config, indent=2) + "\n")


def run_training(run: RunConfig, *, resume: str | None, takeover: bool = False) -> dict[str, Any]:
    """Entry for `neox-train` after argument parsing: validate, init, train, report. The hang watchdog is armed
    from here on, and the rank's fate goes to its status file when a supervisor asked for one (health.py)."""
    adopt_rank_env()  # before anything reads the rank (mpirun / srun ranks, single processes)
    watchdog = Watchdog(HangLimits.from_run(run), rank=int(os.environ.get("RANK", "0"))).start()
    try:
        summary = _run_training(run, resume=resume, takeover=takeover, watchdog=watchdog)
    except NeoxError as e:  # a deliberate stop: bad input, a diverged run, checkpoints that cannot be published
        watchdog.finish(health.STOPPED, exit_code=e.exit_code, detail=f"{e.label}: {e}")
        raise
    except SystemExit as e:  # a second Ctrl-C
        watchdog.finish(health.STOPPED, exit_code=int(e.code or 0), detail="stopped at once by a second Ctrl-C")
        raise
    except BaseException as e:
        watchdog.finish(health.FAILED, exit_code=1, detail=one_line(e))
        raise
    code = exit_code(summary)
    watchdog.finish(health.DONE, exit_code=code, detail=f"stopped by {summary['stopped_by_signal']}" if code else "")
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished run; stopped by a signal (checkpoint saved and flushed): 128 + the signal, so a scheduler
    sees a preempted (143) or interrupted (130) job, not a finished one."""
    name = summary.get("stopped_by_signal")
    return 128 + int(getattr(signal, name)) if isinstance(name, str) else 0


@contextmanager
def stop_signals(trainer: Trainer, topo: Topology) -> Iterator[None]:
    """SIGTERM and a first Ctrl-C (SIGINT): save this step, flush uploads within preemption_grace_s, exit. A second
    Ctrl-C: stop at once, with one line saying what was not saved. Handlers write with os.write: the logging lock
    may be held by the very code they interrupt."""
    run = trainer.plan.run

    def say(text: str) -> None:
        if topo.rank == 0:
            os.write(2, f"neox-train: {text}\n".encode())

    def on_term(_signum, _frame) -> None:
        trainer.request_stop("SIGTERM")

    def on_int(_signum, _frame) -> None:
        if trainer.stop_requested and trainer.stop_signal == "SIGINT":
            latest, _ = commit.read_latest(Path(run.save_dir))
            if latest == f"global_step{trainer.step}":
                saved = f"step {trainer.step} is saved ({latest} in {run.save_dir})"
            else:
                saved = (f"step {trainer.step} was not saved (the newest complete checkpoint is {latest or 'none'} "
                         f"in {run.save_dir})")
            unpublished = trainer.publisher.status.unpublished
            say(f"second Ctrl-C: stopped at once; {saved}"
                + (f"; not published yet: {', '.join(unpublished)} (journaled: the next start publishes them)"
                   if unpublished else ""))
            # Unwinds now (finally blocks stop the upload worker and drop the save dir lock), saving nothing more.
            raise SystemExit(130)
        say(f"Ctrl-C: saving step {trainer.step} at the end of this step and flushing uploads (at most "
            f"{run.preemption_grace_s:g} s); press Ctrl-C again to stop at once without saving")
        trainer.request_stop("SIGINT")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
                signal.SIGINT: signal.signal(signal.SIGINT, on_int)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _run_training(run: RunConfig, *, resume: str | None, takeover: bool, watchdog: Watchdog) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    plan = prepare_run(run, dp_size=world_size_from_env(), on_gpu=on_gpu)
    topo = Topology.from_env()
    node_local = node_local_storage(plan.ds_config)
    setup_logging(Path(run.log_dir), rank=topo.rank)
    _quiet_deepspeed()
    # Everything that can reject the input runs before process groups, model and engine exist.
    point = resume_mod.locate(run, resume)
    owns_folder = is_uploader(topo, node_local)
    if owns_folder:
        check_free(run.save_dir, why=SECOND_RUN)  # a second launch: refused before the data and the bucket
    check_storage_access(run, topo, node_local)
    if run.sync_to and topo.rank == 0:
        inherited = point.run_id or (resume_mod.remote_run_id(point.remote, run.credentials) if point.remote_only
                                     else None)
        check_prefix_owner(run, topo, inherited or new_id(), takeover=takeover)
    data = load_data(plan)
    resume_mod.check(plan, point, data[0].num_tokens)
    # Before the prefix is claimed or a file written: one live process per save dir (a second launch is refused).
    restarted = health.attempt() > 0  # the supervisor's previous attempt may still be going down
    lock = lock_save_dir(run.save_dir, why=SECOND_RUN, wait_s=RESTART_WAIT_S if restarted else WAIT_S) \
        if owns_folder else None
    try:
        summary = _train(run, plan, data, point, topo, node_local, takeover=takeover, watchdog=watchdog)
    except BaseException:
        if lock is not None:
            lock.release(failed_start=True)
        raise
    if lock is not None:
        lock.release()
    return summary


def _train(run: RunConfig, plan: RunPlan, data, point, topo: Topology, node_local: bool, *, takeover: bool,
           watchdog: Watchdog) -> dict[str, Any]:
    """From the process group on: the engine, the claim, the upload worker, the loop and the end-of-run report."""
    init_distributed(timeout_s=watchdog.limits.collective_s)
    if topo.rank == 0:
        log.info("watchdog: %s", watchdog.limits.describe())
    # Verification, downloads from the bucket and universal-checkpoint conversion need the process group (the
    # other ranks wait); so does agreeing on the run's identity.
    plan, resume_tag, identity = resume_mod.finish(plan, point, data[0].num_tokens, topo=topo, node_local=node_local)
    publisher = Publisher(run, topo, node_local=node_local, identity=identity)
    try:
        trainer = Trainer(plan, data, resume_tag=resume_tag, topo=topo, publisher=publisher, watchdog=watchdog)
        if topo.rank == 0:
            record_restart(trainer.metrics, trainer.step)
        resume_mod.after_load(plan, resume_tag, topo=topo, node_local=node_local)
        if topo.rank == 0:
            # Only now that the start succeeded: a start that failed leaves SAVE_DIR as it was.
            write_run_files(plan)
            log.info("run %s: effective run config: %s", identity.run_id, json.dumps(plan.run.to_dict()))
            log.info("effective DeepSpeed config (%s): %s", plan.ds_config_path, json.dumps(plan.ds_config))
            for note in plan.ds_notes:
                log.info("DeepSpeed config change: %s", note)
        publisher.claim(takeover=takeover)
        if run.sync_to and plan.dp_size > 1:
            dist.barrier()  # every node's upload worker starts after the claim: its fences see this run's session
        publisher.start()
        with stop_signals(trainer, topo):
            summary = trainer.train()
    except BaseException:
        publisher.abort()
        raise
    if topo.rank == 0:
        log.info("done: %s", json.dumps(summary))
    sync = summary.get("sync")
    if summary.get("stopped_unpublished"):
        failed = list(sync["failed"].values()) if sync else []
        last = failed[-1] if failed else (sync or {}).get("last_error", "")
        raise UnpublishedCheckpoints(
            f"stopped at step {summary['end_step']}: more than max_unpublished_checkpoints="
            f"{run.max_unpublished_checkpoints} checkpoints could not be published to {run.sync_to} "
            f"({', '.join(sync['unpublished']) if sync else 'see the log'}; last error: {last}); "
            f"they are kept in {run.save_dir}: fix the cause, then `neox-sync --checkpoints {run.save_dir} "
            f"{run.sync_to}` and continue with --resume latest")
    if sync and sync["unpublished"]:
        raise UnpublishedCheckpoints(
            f"{len(sync['unpublished'])} checkpoint(s) not published to {run.sync_to}: {', '.join(sync['unpublished'])}"
            f" (kept in {run.save_dir}; last error: {sync['last_error'] or 'timeout'}; `neox-sync --checkpoints "
            f"{run.save_dir} {run.sync_to}` or the next run with --sync-to finishes them)"
        )
    return summary


def record_restart(metrics, start_step: int) -> None:
    """Under the supervisor, after a restart: run/restarts and run/steps_lost (all restarts so far) at the step
    resumed from, and one WARNING line."""
    restarts = int(os.environ.get(health.RESTARTS_ENV, "0") or 0)
    if not restarts:
        return
    reached = int(os.environ.get(health.PREVIOUS_STEP_ENV, "0") or 0)
    lost = max(0, reached - start_step)
    total = int(os.environ.get(health.STEPS_LOST_ENV, "0") or 0) + lost
    metrics.record(start_step, "run", {"restarts": restarts, "steps_lost": total})
    log.warning("restart %d: resumed at step %d; the previous start reached step %d, so %d step(s) are trained again "
                "(%d over all restarts)", restarts, start_step, reached, lost, total)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every op build at INFO; ours says what matters."""

    level = os.environ.get("NEOX_DEEPSPEED_LOG_LEVEL", "WARNING").upper()

    ds_logger.setLevel(getattr(logging, level, logging.WARNING))
