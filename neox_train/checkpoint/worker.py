"""The background checkpoint sync: a spawn-started process per node that uploads finished checkpoints and
publishes them (manifest, COMPLETE, `latest`), while the training loop never waits on it.

Why a process and not a thread: hashing and HTTP in Python hold the GIL in bursts; in the training process they
would steal time from the step that feeds the GPU. Why spawn: a forked child would inherit CUDA and NCCL state
and the gRPC/HTTP sessions of the parent, none of which survive a fork; the storage client is created in the
child after it starts.

Contract with the trainer (all non-blocking):
  submit(tag)       after the tag is committed locally (complete marker, `latest`). Also appended to the journal,
                    so a crash before the upload finishes is picked up by the next run.
  poll()            drains status messages: pending, published (verified remote, COMPLETE present), failed (for
                    good: kept locally), skipped, lag, bytes, retries.
  close(timeout_s)  flush: wait for the queue to drain with a progress bar, bounded; returns what is left.

Failures are of two kinds (StorageError.transient): a transient one (the network, a 5xx, an object that changed
underneath) is retried with backoff, and the queue waits; a permanent one (no permission, a deleted bucket, a
published checkpoint in the way, the prefix taken over by another run) gives that checkpoint up at once: it is
journaled as failed, stays on local disk, and the next checkpoint goes ahead. A later run (or `neox-sync
--checkpoints`) tries failed checkpoints again.

Journal (SAVE_DIR/.neox-sync/journal-node<k>.jsonl, append-only JSON lines): {"queued": tag} written by the
trainer before the task is handed over, {"published"|"skipped"|"failed": tag} by the worker. At start, a tag is
handed to the new worker when its last record is queued or failed, or when it has none at all (a complete
checkpoint that was never queued: a kill between the commit and the journal line), provided it is still complete
on disk.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_train.checkpoint import commit
from neox_train.checkpoint.journal import (
    append_journal,
    crc_cache_path,
    journal_leftovers,
    journal_path,
    journal_queued,
)
from neox_train.checkpoint.publication import Publication, SyncSettings
from neox_train.checkpoint.tags import sort_key, step_of_tag
from neox_train.errors import one_line
from neox_train.log import log

_STOP = "__stop__"


@dataclass
class SyncStatus:
    pending: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)  # verified remote: by this process or, found at start, earlier
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # given up for good in this process: tag -> why
    last_published_step: int = -1
    last_lag_s: float = float("nan")
    bytes_uploaded: int = 0
    files_uploaded: int = 0
    files_skipped: int = 0
    worker_retries: int = 0  # requests the worker's storage client retried (503s, resets, timeouts)
    failures: int = 0  # attempts that failed transiently and were retried
    failing: bool = False  # the last attempt failed (transiently): uploads are not getting through right now
    last_error: str = ""

    def record_published(self, tag: str, *, lag_s: float, bytes_uploaded: int, files_uploaded: int,
                         files_skipped: int) -> None:
        if tag in self.pending:
            self.pending.remove(tag)
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
        if tag in self.pending:
            self.pending.remove(tag)
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
        }


class SyncWorker:
    """The trainer-side handle of the worker process."""

    def __init__(self, settings: SyncSettings):
        self.settings = settings
        ctx = mp.get_context("spawn")
        # Pipes, not Queues: a Queue's semaphores leak (with a warning at exit) when the worker has to be killed.
        # Messages are a few dozen bytes, far below the pipe buffer, so send() does not block the loop.
        task_recv, self._tasks = ctx.Pipe(duplex=False)
        self._status, status_send = ctx.Pipe(duplex=False)
        self._saving = ctx.Event()
        self._proc = ctx.Process(target=_worker_main,
                                 args=(settings, task_recv, status_send, self._saving, os.getpid()),
                                 daemon=True, name=f"neox-sync-node{settings.node_rank}")
        self.status = SyncStatus()
        self._submitted: set[str] = set()

    def start(self, *, resume_journal: bool = True) -> list[str]:
        """Start the process; tags an interrupted earlier run left unpublished are queued first."""
        self._proc.start()
        leftover = journal_leftovers(Path(self.settings.save_dir), self.settings.node_rank) if resume_journal else []
        for tag in leftover:
            self._submit(tag, committed_at=time.time(), journal=False)
        if leftover:
            log.info("sync: resuming %d unfinished upload(s) from the journal: %s", len(leftover), ", ".join(leftover))
        return leftover

    def submit(self, tag: str) -> None:
        self._submit(tag, committed_at=time.time(), journal=True)

    def set_saving(self, saving: bool) -> None:
        """The trainer is (no longer) writing a checkpoint: the worker holds its next file until the save is done."""
        (self._saving.set if saving else self._saving.clear)()

    def _submit(self, tag: str, *, committed_at: float, journal: bool) -> None:
        if tag in self._submitted:
            return
        if journal:
            journal_queued(Path(self.settings.save_dir), self.settings.node_rank, tag)
        self._submitted.add(tag)
        self.status.pending.append(tag)
        self._tasks.send({"tag": tag, "committed_at": committed_at})

    def poll(self) -> SyncStatus:
        """Apply every status message that has arrived; never blocks."""
        while True:
            try:
                if not self._status.poll(0):
                    break
                msg = self._status.recv()
            except (EOFError, OSError):
                break  # the worker is gone
            self._apply(msg)
        return self.status

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
        elif kind == "skipped":
            tag = msg["tag"]
            if tag in st.pending:
                st.pending.remove(tag)
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
        elif kind == "fatal":
            st.last_error = msg["error"]
            log.error("sync: worker cannot continue: %s", msg["error"])

    def close(self, timeout_s: float, *, progress: bool = True) -> SyncStatus:
        """Flush: let the worker finish every queued tag, up to timeout_s; then stop it. Returns the final status
        (status.unpublished lists what was not published; the journal keeps it for the next run or neox-sync)."""
        from tqdm import tqdm

        try:
            self._tasks.send(_STOP)
        except (BrokenPipeError, OSError):
            pass  # already dead
        deadline = time.monotonic() + timeout_s
        total = len(self.status.pending)
        bar = tqdm(total=total, desc="upload", unit="ckpt", disable=not progress or total == 0)
        while self._proc.is_alive() and time.monotonic() < deadline:
            self._proc.join(timeout=0.5)
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
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)


def save_gate(saving, max_wait_s: float):
    """A callable that returns once no checkpoint save is in progress (or after max_wait_s: a trainer that died
    mid-save must not hold uploads forever)."""

    def gate() -> None:
        deadline = time.monotonic() + max_wait_s
        while saving.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)

    return gate


def is_transient(err: BaseException) -> bool:
    """Worth retrying: a StorageError marked transient. Everything else (no permission, a conflict, a bug) would
    fail the same way again."""
    from neox_train.errors import StorageError

    return isinstance(err, StorageError) and err.transient


class _TrainerGone(BaseException):  # not an Exception: the worker's catch-alls must let it through
    """The trainer's end of the status pipe is closed: it died (kill -9). The journal keeps what is unpublished."""


def _worker_main(settings: SyncSettings, tasks, status_q, saving=None, parent: int | None = None) -> None:
    """Runs in the spawned process (tasks: the receiving end of the task pipe; status_q: the sending end of the
    status pipe; parent: the trainer's pid). Never raises: failures are reported, and retried when transient."""
    try:
        _work(settings, tasks, status_q, saving, parent)
    except _TrainerGone:
        return


def _work(settings: SyncSettings, tasks, status_q, saving, parent: int | None) -> None:
    import signal

    from neox_train.remote import open_backend
    from neox_train.remote.files import Crc32cCache

    # The trainer owns shutdown: on SIGTERM/Ctrl-C (sent to the whole process group) it saves, then flushes this
    # queue with a bounded wait and stops us itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = parent if parent is not None else os.getppid()
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing RLock (a named semaphore); if this process is SIGKILLed, the
    # resource tracker then warns about it leaking at the trainer's exit. A thread lock is all we need here.
    tqdm.set_lock(threading.RLock())
    try:
        # Uploads are background work: when CPU is short, the training process (feeding the GPU) goes first.
        os.nice(10)
    except OSError:
        pass
    try:
        # If the trainer is killed (-9, OOM killer), die with it instead of retrying uploads as an orphan that
        # would race the next run's worker; the journal hands the unfinished tags to that run. Linux only.
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return  # the trainer died while this process started (too early for the death signal): do nothing
    save_dir = Path(settings.save_dir)
    jpath = journal_path(save_dir, settings.node_rank)
    try:
        backend = open_backend(settings.url, credentials=settings.credentials)
    except Exception as e:  # noqa: BLE001 - reported to the trainer, which checked access at start-up already
        try:
            status_q.send({"kind": "fatal", "error": one_line(e)})
        except (BrokenPipeError, ConnectionError, EOFError):
            pass
        return

    def send(msg: dict[str, Any]) -> None:
        try:
            status_q.send({**msg, "retries": backend.retries})
        except (BrokenPipeError, ConnectionError, EOFError) as e:
            raise _TrainerGone() from e

    cache = Crc32cCache(crc_cache_path(save_dir, settings.node_rank))
    gate = save_gate(saving, settings.yield_to_save_max_s) if saving is not None else None
    publisher = Publication(backend, settings, cache, gate=gate)
    try:
        # What earlier processes published is verified remote too: local retention may delete it (the trainer
        # only deletes what it is told is verified).
        verified = verified_local_tags(backend, settings)
        if verified:
            send({"kind": "verified", "tags": verified})
    except Exception as e:  # noqa: BLE001 - retention just waits for this run's own publications
        send({"kind": "failure", "tag": "(start-up check)", "attempt": 1, "retry_in_s": 0, "error": one_line(e)})
    pending: deque[dict[str, Any]] = deque()
    awaiting: dict[str, tuple[dict[str, Any], float]] = {}  # uploaded, waiting for the other nodes / COMPLETE
    stopping = False
    attempt = 0
    next_try = 0.0
    next_poll = 0.0

    def give_up(task: dict[str, Any], err: BaseException | str) -> None:
        error = err if isinstance(err, str) else one_line(err)
        append_journal(jpath, {"failed": task["tag"], "error": error, "time": time.time()})
        send({"kind": "failed", "tag": task["tag"], "error": error})

    def published(task: dict[str, Any], result) -> None:
        append_journal(jpath, {"published": task["tag"], "time": time.time()})
        send({"kind": "published", "tag": task["tag"], "lag_s": time.time() - task["committed_at"],
              "bytes_uploaded": result.bytes_uploaded, "files_uploaded": result.files_uploaded,
              "files_skipped": result.files_skipped})

    while True:
        # Take everything queued; block only when there is nothing to do.
        block = not pending and not awaiting and not stopping
        try:
            ready = tasks.poll(0.5 if block else 0)
            while ready:
                item = tasks.recv()
                if item == _STOP:
                    stopping = True
                else:
                    pending.append(item)
                ready = tasks.poll(0)
        except (EOFError, OSError):
            stopping = True  # the trainer closed its end: finish what is queued, then stop
        if stopping and not pending and not awaiting:
            return
        if os.getppid() != parent:
            return  # the trainer died (kill -9): what is unpublished stays in the journal for the next run
        if awaiting and time.monotonic() >= next_poll:
            next_poll = time.monotonic() + settings.finalize_poll_s
            for tag, (task, since) in list(awaiting.items()):
                try:
                    done = publisher.try_complete(tag)
                except Exception as e:  # noqa: BLE001 - one failure must never kill the worker
                    if is_transient(e):
                        continue
                    del awaiting[tag]
                    give_up(task, e)
                    continue
                if done:
                    del awaiting[tag]
                    published(task, task["result"])
                elif time.monotonic() - since > settings.await_other_nodes_s:
                    del awaiting[tag]
                    give_up(task, f"the other nodes' parts of {tag} did not arrive within "
                                  f"{settings.await_other_nodes_s:.0f} s")
        if not pending:
            if awaiting:
                time.sleep(min(0.2, settings.finalize_poll_s))
            continue
        if settings.max_pending and len(pending) > settings.max_pending:
            # Keep the oldest (it may be mid-upload across retries) and the newest; drop what lies between.
            while len(pending) > settings.max_pending and len(pending) > 2:
                dropped = pending[1]
                del pending[1]
                append_journal(jpath, {"skipped": dropped["tag"], "time": time.time()})
                send({"kind": "skipped", "tag": dropped["tag"]})
        if time.monotonic() < next_try:
            time.sleep(min(0.5, next_try - time.monotonic()))
            continue
        task = pending[0]
        tag = task["tag"]
        try:
            result = publisher.upload(tag)
            done = publisher.try_complete(tag)
        except Exception as e:  # noqa: BLE001 - one failure must never kill the worker
            if not is_transient(e):
                pending.popleft()
                attempt = 0
                give_up(task, e)
                continue
            attempt += 1
            delay = min(settings.retry_max_s, settings.retry_initial_s * 2 ** (attempt - 1))
            next_try = time.monotonic() + delay
            send({"kind": "failure", "tag": tag, "attempt": attempt, "retry_in_s": delay, "error": one_line(e),
                  "trace": traceback.format_exc(limit=3)})
            if stopping and attempt >= 3:
                # Flushing at exit: after a few attempts give up on this tag; it stays in the journal.
                pending.popleft()
                attempt = 0
            continue
        attempt = 0
        pending.popleft()
        if done:
            published(task, result)
        else:
            awaiting[tag] = ({**task, "result": result}, time.monotonic())


def verified_local_tags(backend, settings: SyncSettings) -> list[str]:
    from neox_train.checkpoint.fetch import verified_remote

    save_dir = Path(settings.save_dir)
    return verified_remote(backend, save_dir, commit.complete_tags(save_dir), node_rank=settings.node_rank)


