"""`neox-train` after its flags are parsed: the order in which a run is checked, started, trained
and reported.

The session (session.py) is checked and started, the loop runs under the stop signals' handlers, and
a run that could not publish its checkpoints raises UnpublishedCheckpoints at the end.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neox_train import health
from neox_train.checkpoint.local import commit
from neox_train.config import RunConfig
from neox_train.distributed import Topology, adopt_rank_env
from neox_train.errors import NeoxError, UnpublishedCheckpoints, one_line
from neox_train.log import log
from neox_train.train.session import start_session
from neox_train.train.trainer import Trainer
from neox_train.train.watchdog import HangLimits, Watchdog


def run_training(run: RunConfig, *, resume: str | None, takeover: bool = False) -> dict[str, Any]:
    """Entry for `neox-train` after argument parsing: validate, init, train, report. The hang
    watchdog is armed from here on, and the rank's fate goes to its status file when a supervisor
    asked for one (health.py)."""
    adopt_rank_env()  # before anything reads the rank (mpirun / srun ranks, single processes)
    watchdog = Watchdog(HangLimits.from_run(run), rank=int(os.environ.get("RANK", "0"))).start()
    try:
        summary = _train(run, resume=resume, takeover=takeover, watchdog=watchdog)
    # a deliberate stop: bad input, a diverged run, checkpoints that cannot be published
    except NeoxError as e:
        watchdog.finish(health.STOPPED, exit_code=e.exit_code, detail=f"{e.label}: {e}")
        raise
    except SystemExit as e:  # a second Ctrl-C
        watchdog.finish(health.STOPPED, exit_code=int(e.code or 0),
                        detail="stopped at once by a second Ctrl-C")
        raise
    except BaseException as e:
        watchdog.finish(health.FAILED, exit_code=1, detail=one_line(e))
        raise
    code = exit_code(summary)
    watchdog.finish(health.DONE, exit_code=code,
                    detail=f"stopped by {summary['stopped_by_signal']}" if code else "")
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished run; stopped by a signal (checkpoint saved and flushed): 128 + the signal,
    so a scheduler sees a preempted (143) or interrupted (130) job, not a finished one."""
    name = summary.get("stopped_by_signal")
    return 128 + int(getattr(signal, name)) if isinstance(name, str) else 0


@contextmanager
def stop_signals(trainer: Trainer, topo: Topology) -> Iterator[None]:
    """SIGTERM and a first Ctrl-C (SIGINT): save this step, flush uploads within preemption_grace_s,
    exit. A second Ctrl-C: stop at once, with one line saying what was not saved. Handlers write
    with os.write: the logging lock may be held by the very code they interrupt."""
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
                saved = (f"step {trainer.step} was not saved (the newest complete checkpoint is "
                         f"{latest or 'none'} in {run.save_dir})")
            unpublished = trainer.publisher.status.unpublished
            say(f"second Ctrl-C: stopped at once; {saved}"
                + (f"; not published yet: {', '.join(unpublished)} (journaled: the next start "
                   "publishes them)"
                   if unpublished else ""))
            # Unwinds now (finally blocks stop the upload worker and drop the save dir lock), saving
            # nothing more.
            raise SystemExit(130)
        say(f"Ctrl-C: saving step {trainer.step} at the end of this step and flushing uploads (at "
            f"most {run.preemption_grace_s:g} s); press Ctrl-C again to stop at once without "
            "saving")
        trainer.request_stop("SIGINT")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
                signal.SIGINT: signal.signal(signal.SIGINT, on_int)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _train(run: RunConfig, *, resume: str | None, takeover: bool,
           watchdog: Watchdog) -> dict[str, Any]:
    session = start_session(run, resume=resume, takeover=takeover, watchdog=watchdog)
    try:
        with stop_signals(session.trainer, session.topo):
            summary = session.trainer.train()
    except BaseException:
        session.close(failed=True)
        raise
    session.close()
    if session.topo.rank == 0:
        log.info("done: %s", json.dumps(summary))
    sync = summary.get("sync")
    if summary.get("stopped_unpublished"):
        failed = list(sync["failed"].values()) if sync else []
        last = failed[-1] if failed else (sync or {}).get("last_error", "")
        raise UnpublishedCheckpoints(
            f"stopped at step {summary['end_step']}: more than max_unpublished_checkpoints="
            f"{run.max_unpublished_checkpoints} checkpoints could not be published to "
            f"{run.sync_to} ({', '.join(sync['unpublished']) if sync else 'see the log'}; last "
            f"error: {last}); they are kept in {run.save_dir}: fix the cause, then `neox-sync "
            f"--checkpoints {run.save_dir} {run.sync_to}` and continue with --resume latest")
    if sync and sync["unpublished"]:
        raise UnpublishedCheckpoints(
            f"{len(sync['unpublished'])} checkpoint(s) not published to {run.sync_to}: "
            f"{', '.join(sync['unpublished'])} (kept in {run.save_dir}; last error: "
            f"{sync['last_error'] or 'timeout'}; `neox-sync --checkpoints {run.save_dir} "
            f"{run.sync_to}` or the next run with --sync-to finishes them)"
        )
    return summary
