"""The trainer's handle on the upload process (worker.py): `SyncWorker`, and the `SyncStatus` it keeps.

Its contract, all non-blocking:
  submit(tag)       after the tag is committed locally. Also appended to the journal first, so a crash before
                    the upload finishes is picked up by the next run.
  poll()            drains status messages into a `SyncStatus`: pending, published (verified remote, COMPLETE
                    present), failed (for good: kept locally), skipped, lag, bytes, retries; and starts a worker
                    that died again.
  close(timeout_s)  flush: wait for the queue to drain with a progress bar, bounded; returns what is left. On a
                    node other than 0 (node-local storage) the flush ends once its parts are uploaded: they are
                    `handed` to node 0, which publishes.

Journal (SAVE_DIR/.neox-sync/journal-node<k>.jsonl, append-only JSON lines, journal.py): {"queued": tag} written
here before the task is handed over, {"published"|"skipped"|"failed": tag} by the worker. At start, a tag is
handed to the new worker when its last record is queued or failed, or when it has none at all (a complete
checkpoint that was never queued: a kill between the commit and the journal line), provided it is still complete
on disk.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neox_train.checkpoint.journal import journal_leftovers, journal_queued
from neox_train.checkpoint.publication import SyncSettings
from neox_train.checkpoint.tags import sort_key, step_of_tag
from neox_train.checkpoint.worker import _STOP, _worker_main
from neox_train.log import log

# A dead upload worker is started again at once the first time, then after 5 s, 10 s, ... at most 5 minutes.
WORKER_RESTART_WAIT_S = 5.0
WORKER_RESTART_WAIT_MAX_S = 300.0


@dataclass
class SyncStatus:
    pending: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)  # verified remote: by this process or, found at start, earlier
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # given up for good in this process: tag -> why
    # At exit on a node other than 0 (node-local storage): this node's part is remote, node 0 publishes the tag.
    handed: list[str] = field(default_factory=list)
    last_published_step: int = -1
    last_lag_s: float = float("nan")
    bytes_uploaded: int = 0
    files_uploaded: int = 0
    files_skipped: int = 0
    worker_retries: int = 0  # requests the worker's storage client retried (503s, resets, timeouts)
    failures: int = 0  # attempts that failed transiently and were retried
    failing: bool = False  # the last attempt failed (transiently): uploads are not getting through right now
    worker_restarts: int = 0  # times the upload process died and was started again
    last_error: str = ""

    def settle(self, tag: str) -> None:
        """The worker is done with `tag` (published, failed, skipped or handed): no longer pending."""
        if tag in self.pending:
            self.pending.remove(tag)

    def record_published(self, tag: str, *, lag_s: float, bytes_uploaded: int, files_uploaded: int,
                         files_skipped: int) -> None:
        self.settle(tag)
        self.failed.pop(tag, None)
        self.failing = False
        if tag not in self.published:
            self.published.append(tag)
        step = step_of_tag(tag)
        self.last_published_step = max(self.last_published_step, -1 if step is None else step)
        self.last_lag_s = lag_s
        self.bytes_uploaded += bytes_uploaded
        self.files_uploaded += files_uploaded
        self.files_skipped += files_skipped

    def record_failed(self, tag: str, error: str) -> None:
        self.settle(tag)
        self.failed[tag] = error
        self.last_error = error

    @property
    def unpublished(self) -> list[str]:
        """Checkpoints of this run kept locally because they are not published (yet, or for good)."""
        return sorted({*self.pending, *self.failed}, key=sort_key)

    @property
    def stuck(self) -> list[str]:
        """Checkpoints kept locally because publishing fails: those given up for good and, while every attempt
        fails, those waiting. (A backlog that is merely slow, a worker still starting, does not count.)"""
        return sorted({*self.failed, *(self.pending if self.failing else ())}, key=sort_key)

    def metrics(self, *, retries: int) -> dict[str, float]:
        return {
            "pending": float(len(self.pending)),
            "failed": float(len(self.failed)),
            "last_published_step": float(self.last_published_step),
            "lag_s": self.last_lag_s,
            "bytes_uploaded": float(self.bytes_uploaded),
            "retries": float(retries),
            "failures": float(self.failures),
            "worker_restarts": float(self.worker_restarts),
        }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class SyncWorker:
    """The trainer-side handle of the worker process. A worker that dies (the OOM killer, a person's kill) is
    started again with every checkpoint it had not published, so one lost process does not end publishing for the
    rest of a days-long run; a worker that keeps dying is restarted after a doubling wait, and none of the
    trainer's calls raise or block because of it."""

    def __init__(self, settings: SyncSettings):
        self.settings = settings
        self.status = SyncStatus()
        self._submitted: set[str] = set()
        self._tasks_by_tag: dict[str, dict[str, Any]] = {}  # what was handed over, to hand over again after a death
        self._saving_now = False
        self._started = False
        self._stopped = False  # close() or kill(): a dead process is expected from here on
        self._restart_at = 0.0  # monotonic time before which no new process is started
        self._restart_wait_s = 0.0
        self._owner: int | None = None  # the thread that started the worker
        self._new_process()

    def _new_process(self) -> None:
        ctx = mp.get_context("spawn")
        # Pipes, not Queues: a Queue's semaphores leak (with a warning at exit) when the worker has to be killed.
        # Messages are a few dozen bytes, far below the pipe buffer, so send() does not block the loop.
        task_recv, self._tasks = ctx.Pipe(duplex=False)
        self._status, status_send = ctx.Pipe(duplex=False)
        self._saving = ctx.Event()
        if self._saving_now:
            self._saving.set()
        self._proc = ctx.Process(target=_worker_main,
                                 args=(self.settings, task_recv, status_send, self._saving, os.getpid()),
                                 daemon=True, name=f"neox-sync-node{self.settings.node_rank}")

    def _launch(self) -> None:
        # The scheduler's SIGTERM (and Ctrl-C's SIGINT) go to the whole process group, and the trainer owns
        # shutdown: the worker must ignore them from its first instruction, not from when its own code runs
        # (seconds later on a busy machine). A blocked signal stays blocked across fork and exec, so the child
        # starts with both held back; it ignores them, then unblocks (worker._detach_from_the_loop). Blocked in
        # this thread only, and only during start(): one sent meanwhile reaches the trainer right after.
        held = {signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def start(self, *, resume_journal: bool = True) -> list[str]:
        """Start the process; tags an interrupted earlier run left unpublished are queued first."""
        self._launch()
        self._started = True
        # The worker dies with the thread that started it (PR_SET_PDEATHSIG is per thread, worker.py), so only this
        # thread, the trainer's main loop, ever starts a new one.
        self._owner = threading.get_ident()
        leftover = journal_leftovers(Path(self.settings.save_dir), self.settings.node_rank) if resume_journal else []
        for tag in leftover:
            self._submit(tag, committed_at=time.time(), journal=False)
        if leftover:
            log.info("sync: resuming %d unfinished upload(s) from the journal: %s", len(leftover), ", ".join(leftover))
        return leftover

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def submit(self, tag: str, *, first: bool = False) -> None:
        self._submit(tag, committed_at=time.time(), journal=True, first=first)

    def set_saving(self, saving: bool) -> None:
        """The trainer is (no longer) writing a checkpoint: the worker holds its next file until the save is done."""
        self._saving_now = saving
        (self._saving.set if saving else self._saving.clear)()

    def _submit(self, tag: str, *, committed_at: float, journal: bool, first: bool = False) -> None:
        if tag in self._submitted:
            return
        if journal:
            journal_queued(Path(self.settings.save_dir), self.settings.node_rank, tag)
        self._submitted.add(tag)
        self.status.pending.append(tag)
        self._tasks_by_tag[tag] = {"tag": tag, "committed_at": committed_at, "first": first}
        self._send(self._tasks_by_tag[tag])
        self._restart_if_dead()

    def _send(self, msg: Any) -> None:
        try:
            self._tasks.send(msg)
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: _restart_if_dead hands the task to the next one

    def _restart_if_dead(self) -> None:
        """A worker that died while it was wanted is replaced (once the backoff allows) and handed every task not
        yet published, in the order they came, before anything new."""
        if not self._started or self._stopped or self._proc.is_alive() or threading.get_ident() != self._owner:
            return
        code = self._proc.exitcode
        if code == 0:
            return  # it ended by itself: the trainer is gone, or it reported why it cannot go on ("fatal")
        now = time.monotonic()
        if now < self._restart_at:
            return
        self._drain()  # what the dead process reported before it died still counts
        cause = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        self.status.worker_restarts += 1
        log.error("sync: the upload worker died (%s); starting it again with %d unpublished checkpoint(s)%s", cause,
                  len(self.status.pending), ": " + ", ".join(self.status.pending) if self.status.pending else "")
        self._new_process()
        self._launch()
        for tag in self.status.pending:
            self._send(self._tasks_by_tag[tag])
        # A worker that dies again at once (a bug, no memory) is not respawned in a loop.
        self._restart_wait_s = min(max(2 * self._restart_wait_s, WORKER_RESTART_WAIT_S), WORKER_RESTART_WAIT_MAX_S)
        self._restart_at = now + self._restart_wait_s

    def poll(self) -> SyncStatus:
        """Apply every status message that has arrived (and restart a worker that died); never blocks."""
        self._drain()
        self._restart_if_dead()
        return self.status

    def _drain(self) -> None:
        while True:
            try:
                if not self._status.poll(0):
                    break
                msg = self._status.recv()
            except (EOFError, OSError):
                break  # the worker is gone
            self._apply(msg)

    def _apply(self, msg: dict[str, Any]) -> None:
        st = self.status
        kind = msg["kind"]
        st.worker_retries = max(st.worker_retries, int(msg.get("retries", 0)))
        if kind == "published":
            tag = msg["tag"]
            st.record_published(tag, lag_s=msg["lag_s"], bytes_uploaded=msg["bytes_uploaded"],
                                files_uploaded=msg["files_uploaded"], files_skipped=msg["files_skipped"])
            log.info("sync: published %s to %s (%d files, %d bytes uploaded, lag %.1f s)", tag, self.settings.url,
                     msg["files_uploaded"], msg["bytes_uploaded"], msg["lag_s"])
        elif kind == "verified":
            for tag in msg["tags"]:
                if tag not in st.published:
                    st.published.append(tag)
        elif kind == "handed":
            tag = msg["tag"]
            st.settle(tag)
            st.handed.append(tag)
            log.info("sync: %s: this node's part is uploaded to %s; node 0 publishes the checkpoint (its log says "
                     "whether it did)", tag, self.settings.url)
        elif kind == "skipped":
            tag = msg["tag"]
            st.settle(tag)
            st.skipped.append(tag)
            log.warning("sync: skipped superseded checkpoint %s (backlog over max_pending); it stays on local disk",
                        tag)
        elif kind == "failed":
            st.record_failed(msg["tag"], msg["error"])
            log.error("sync: cannot publish %s to %s, giving it up (it stays on local disk; %d checkpoint(s) "
                      "unpublished): %s", msg["tag"], self.settings.url, len(st.unpublished), msg["error"])
        elif kind == "failure":
            st.failures += 1
            st.failing = True
            st.last_error = msg["error"]
            log.warning("sync: %s failed (attempt %d, retrying in %.0f s): %s", msg["tag"], msg["attempt"],
                        msg["retry_in_s"], msg["error"])
        elif kind == "unreachable":
            st.failing = True  # what waits is stuck now: max_unpublished_checkpoints applies as to any failure
            st.last_error = msg["error"]
            log.warning("sync: %s has not answered for %.0f s (every request fails: %s); %d checkpoint(s) "
                        "unpublished (%s), kept on local disk while uploads keep retrying; training stops once more "
                        "than max_unpublished_checkpoints are stuck", msg["endpoint"], msg["seconds"], msg["error"],
                        len(st.unpublished), ", ".join(st.unpublished) or "none yet")
        elif kind == "reachable":
            st.failing = False
            log.info("sync: %s answers again; uploads continue", self.settings.url)
        elif kind == "fatal":
            st.last_error = msg["error"]
            log.error("sync: worker cannot continue: %s", msg["error"])

    def close(self, timeout_s: float, *, progress: bool = True,
              cutoff: Callable[[], float | None] | None = None) -> SyncStatus:
        """Flush: let the worker finish every queued tag, up to timeout_s and, once `cutoff()` names a monotonic
        time (a stop signal arrived meanwhile), up to then; then stop it. Returns the final status
        (status.unpublished lists what was not published; the journal keeps it for the next run or neox-sync)."""

        self.poll()  # a worker that died gets its chance to flush too
        self._stopped = True
        self._send(_STOP)
        deadline = time.monotonic() + timeout_s
        total = len(self.status.pending)
        bar = tqdm(total=total, desc="upload", unit="ckpt", disable=not progress or total == 0)
        while self._proc.is_alive() and time.monotonic() < deadline:
            limit = cutoff() if cutoff is not None else None
            if limit is not None:
                deadline = min(deadline, limit)
            self._proc.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            self.poll()
            bar.n = total - len(self.status.pending)
            bar.refresh()
        bar.close()
        self.kill()
        self.poll()
        return self.status

    def kill(self) -> None:
        """Stop the process now. SIGKILL, because the worker ignores SIGTERM (the trainer owns shutdown) and may sit
        inside a request that the client retries for minutes; what it had not published stays in the journal."""
        self._stopped = True
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
