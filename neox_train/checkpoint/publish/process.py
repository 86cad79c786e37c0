"""The upload process itself: what runs inside the spawn-started child that `Publisher`
(publisher.py) starts per node.

Why a process and not a thread: hashing and HTTP in Python hold the GIL in bursts; in the training
process they would steal time from the step that feeds the GPU. Why spawn: a forked child would
inherit CUDA and NCCL state and the gRPC/HTTP sessions of the parent, none of which survive a fork;
the storage client is created here, in the child, after it starts.

The child takes tags from a task queue, uploads them oldest first (`Publication`: the steps of
publishing one tag, shared with the inline path that runs without a worker), reports each outcome on
a status queue and journals it ({"published"|"skipped"|"failed": tag}). While the trainer is inside
a save (`save_gate`), it waits, so its disk reads and hashing do not compete with the save's writes.

Failures are of two kinds (StorageError.transient): a transient one (the network, a 5xx, an object
that changed underneath) is retried with backoff, and the queue waits; a permanent one (no
permission, a deleted bucket, a published checkpoint in the way, the prefix taken over by another
run) gives that checkpoint up at once: it is journaled as failed, stays on local disk, and the next
checkpoint goes ahead. A later run (or `neox-sync
--checkpoints`) tries failed checkpoints again. The child exits when its parent does
(`_TrainerGone`), so a killed trainer never leaves an orphan uploading.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neox_train.checkpoint.publish.fetch import verified_local_tags
from neox_train.checkpoint.publish.journal import (
    append_journal,
    crc_cache_path,
    journal_path,
    journal_published,
)
from neox_train.checkpoint.publish.protocol import Publication
from neox_train.checkpoint.publish.settings import PublishSettings
from neox_train.errors import is_transient, one_line
from neox_train.remote.files import Crc32cCache

STOP = "__stop__"


def save_gate(saving, max_wait_s: float):
    """A callable that returns once no checkpoint save is in progress (or after max_wait_s: a
    trainer that died mid-save must not hold uploads forever)."""

    def gate() -> None:
        deadline = time.monotonic() + max_wait_s
        while saving.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)

    return gate


class _TrainerGone(BaseException):  # not an Exception: the worker's catch-alls must let it through
    """The trainer's end of the status pipe is closed: it died (kill -9). The journal keeps what is
    unpublished."""


def run_upload_process(settings: PublishSettings, tasks, status_q, saving=None,
                       parent: int | None = None) -> None:
    """Runs in the spawned process (tasks: the receiving end of the task pipe; status_q: the sending
    end of the status pipe; parent: the trainer's pid). Never raises: failures are reported, and
    retried when transient."""
    try:
        _work(settings, tasks, status_q, saving, parent)
    except _TrainerGone:
        return


def _work(settings: PublishSettings, tasks, status_q, saving, parent: int | None) -> None:
    parent = parent if parent is not None else os.getppid()
    _detach_from_the_loop()
    if os.getppid() != parent:
        # the trainer died while this process started (too early for the death signal): do nothing
        return
    try:
        backend = settings.open_backend()
    # reported to the trainer, which checked access at start-up already
    except Exception as e:  # noqa: BLE001
        try:
            status_q.send({"kind": "fatal", "error": one_line(e)})
        except (BrokenPipeError, ConnectionError, EOFError):
            pass
        return
    _Uploads(settings, backend, tasks, status_q, saving, parent).run()


def _detach_from_the_loop() -> None:
    """What makes this a well-behaved background process: it leaves shutdown to the trainer, yields
    the CPU to it, and dies with it."""

    # The trainer owns shutdown: on SIGTERM/Ctrl-C (sent to the whole process group) it saves, then
    # flushes this queue with a bounded wait and stops us itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Publisher started this process with both blocked (a signal before this line must not kill it
    # either): what is pending is now discarded, as ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    # tqdm's default lock is a multiprocessing RLock (a named semaphore); if this process is
    # SIGKILLed, the resource tracker then warns about it leaking at the trainer's exit. A thread
    # lock is all we need here.
    tqdm.set_lock(threading.RLock())
    try:
        # Uploads are background work: when CPU is short, the training process (feeding the GPU)
        # goes first.
        os.nice(10)
    except OSError:
        pass
    try:
        # If the trainer is killed (-9, OOM killer), die with it instead of retrying uploads as an
        # orphan that would race the next run's worker; the journal hands the unfinished tags to
        # that run. Linux only.

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Uploads:
    """The worker process's loop: take tasks, upload the oldest, retry transient failures with
    backoff, give permanent ones up, and watch the tags whose other nodes' parts (or node 0's
    COMPLETE) are still to come."""

    def __init__(self, settings: PublishSettings, backend, tasks, status_q, saving, parent: int):
        self.settings, self.backend, self.tasks = settings, backend, tasks
        self.status_q, self.parent = status_q, parent
        self.send_lock = threading.Lock()
        # the backend's one-line warnings (a bucket that refuses parallel uploads) reach the log
        backend.warn = lambda message: self.send({"kind": "warning", "message": message})
        save_dir = Path(settings.save_dir)
        self.jpath = journal_path(save_dir, settings.node_rank)
        gate = save_gate(saving, settings.yield_to_save_max_s) if saving is not None else None
        self.publication = Publication(backend, settings,
                                       Crc32cCache(crc_cache_path(save_dir, settings.node_rank)),
                                       gate=gate)
        self.pending: deque[dict[str, Any]] = deque()
        # uploaded, waiting for the other nodes
        self.awaiting: dict[str, tuple[dict[str, Any], float]] = {}
        self.stopping = False
        self.attempt = 0
        self.next_try = 0.0
        self.next_poll = 0.0

    def send(self, msg: dict[str, Any]) -> None:
        try:
            with self.send_lock:  # the endpoint watch sends from its own thread
                self.status_q.send({**msg, "retries": self.backend.retries})
        except (BrokenPipeError, ConnectionError, EOFError) as e:
            raise _TrainerGone() from e

    def watch_endpoint(self) -> None:
        """A thread: the storage client retries a refused or silent endpoint for minutes inside one
        request, so the loop above learns of an outage only at the retry deadline. Once requests
        have failed with none getting through for unreachable_warning_s, say so (the trainer warns
        and counts the waiting checkpoints as stuck, so max_unpublished_checkpoints applies); say
        again when one gets through."""
        failing_for = getattr(self.backend, "failing_for", None)
        if failing_for is None:
            return  # a folder: no retries to hide an outage
        reported = False
        while True:
            time.sleep(min(1.0, self.settings.unreachable_warning_s / 4))
            seconds, error = failing_for()
            try:
                if not reported and seconds >= self.settings.unreachable_warning_s:
                    self.send({"kind": "unreachable", "seconds": seconds, "error": error,
                               "endpoint": getattr(self.backend, "host", self.settings.url)})
                    reported = True
                elif reported and seconds == 0:
                    self.send({"kind": "reachable"})
                    reported = False
            except _TrainerGone:
                return

    def give_up(self, task: dict[str, Any], err: BaseException | str) -> None:
        error = err if isinstance(err, str) else one_line(err)
        append_journal(self.jpath, {"failed": task["tag"], "error": error, "time": time.time()})
        self.send({"kind": "failed", "tag": task["tag"], "error": error})

    def published(self, task: dict[str, Any], result) -> None:
        journal_published(Path(self.settings.save_dir), self.settings.node_rank, task["tag"])
        self.send({"kind": "published", "tag": task["tag"],
                   "lag_s": time.time() - task["committed_at"],
                   "timings": {"upload_s": round(task.get("upload_s", 0.0), 3),
                               "publish_s": round(time.monotonic()
                                                  - task.get("uploaded_at", time.monotonic()), 3)},
                   "bytes_uploaded": result.bytes_uploaded, "files_uploaded": result.files_uploaded,
                   "files_skipped": result.files_skipped})

    def run(self) -> None:
        threading.Thread(target=self.watch_endpoint, name="neox-sync-endpoint", daemon=True).start()
        self.report_verified()
        while True:
            self.take_tasks()
            if self.stopping and not self.pending:
                if not self.settings.finalizes:
                    self.hand_over()
                if not self.awaiting:
                    return
            if os.getppid() != self.parent:
                # the trainer died (kill -9): what is unpublished stays in the journal for the next
                # run
                return
            self.poll_awaiting()
            if not self.pending:
                if self.awaiting:
                    time.sleep(min(0.2, self.settings.finalize_poll_s))
                continue
            self.skip_superseded()
            if time.monotonic() < self.next_try:
                time.sleep(min(0.5, self.next_try - time.monotonic()))
                continue
            self.attempt_oldest()

    def hand_over(self) -> None:
        """Exiting on a node other than 0: its parts are remote, and finishing the checkpoints is
        node 0's work. Waiting here for a COMPLETE that node 0 may have given up on would hold this
        node (and the launcher) for the whole upload timeout. The journal keeps them queued: the
        next start sees what node 0 did."""
        self.next_poll = 0.0
        # a last look: what node 0 has published by now is reported as published
        self.poll_awaiting()
        for tag in self.awaiting:
            self.send({"kind": "handed", "tag": tag})
        self.awaiting.clear()

    def report_verified(self) -> None:
        """What earlier processes published is verified remote too: local retention may delete it
        (the trainer only deletes what it is told is verified)."""
        try:
            verified = verified_local_tags(self.backend, self.settings)
        # retention just waits for this run's own publications
        except Exception as e:  # noqa: BLE001
            self.send({"kind": "failure", "tag": "(start-up check)", "attempt": 1, "retry_in_s": 0,
                       "error": one_line(e)})
            return
        if verified:
            self.send({"kind": "verified", "tags": verified})

    def take_tasks(self) -> None:
        """Take everything queued; block (briefly) only when there is nothing to do."""
        block = not self.pending and not self.awaiting and not self.stopping
        try:
            ready = self.tasks.poll(0.5 if block else 0)
            while ready:
                item = self.tasks.recv()
                if item == STOP:
                    self.stopping = True
                elif item.get("first"):
                    # the preemption save: its budget is seconds, the backlog waits
                    self.pending.appendleft(item)
                else:
                    self.pending.append(item)
                ready = self.tasks.poll(0)
        except (EOFError, OSError):
            self.stopping = True  # the trainer closed its end: finish what is queued, then stop

    def poll_awaiting(self) -> None:
        if not self.awaiting or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + self.settings.finalize_poll_s
        for tag, (task, since) in list(self.awaiting.items()):
            try:
                done = self.publication.try_complete(tag)
            except Exception as e:  # noqa: BLE001 - one failure must never kill the worker
                if not is_transient(e):
                    del self.awaiting[tag]
                    self.give_up(task, e)
                continue
            if done:
                del self.awaiting[tag]
                self.published(task, task["result"])
            elif time.monotonic() - since > self.settings.await_other_nodes_s:
                del self.awaiting[tag]
                self.give_up(task, f"the other nodes' parts of {tag} did not arrive within "
                                   f"{self.settings.await_other_nodes_s:.0f} s")

    def skip_superseded(self) -> None:
        """Over max_pending: keep the oldest (it may be mid-upload across retries) and the newest;
        drop what lies between (kept locally, journaled as skipped)."""
        limit = self.settings.max_pending
        while limit and len(self.pending) > limit and len(self.pending) > 2:
            dropped = self.pending[1]
            del self.pending[1]
            append_journal(self.jpath, {"skipped": dropped["tag"], "time": time.time()})
            self.send({"kind": "skipped", "tag": dropped["tag"]})

    def attempt_oldest(self) -> None:
        task = self.pending[0]
        tag = task["tag"]
        try:
            started = time.monotonic()
            result = self.publication.upload(tag)
            task.update(upload_s=time.monotonic() - started, uploaded_at=time.monotonic())
            done = self.publication.try_complete(tag)
        except Exception as e:  # noqa: BLE001 - one failure must never kill the worker
            self.failed_attempt(task, e)
            return
        self.attempt = 0
        self.pending.popleft()
        if done:
            self.published(task, result)
        else:
            self.awaiting[tag] = ({**task, "result": result}, time.monotonic())

    def failed_attempt(self, task: dict[str, Any], e: Exception) -> None:
        """Permanent: give the tag up now. Transient: retry with exponential backoff (at exit, a few
        times only)."""
        if not is_transient(e):
            self.pending.popleft()
            self.attempt = 0
            self.give_up(task, e)
            return
        self.attempt += 1
        delay = min(self.settings.retry_max_s,
                    self.settings.retry_initial_s * 2 ** (self.attempt - 1))
        self.next_try = time.monotonic() + delay
        self.send({"kind": "failure", "tag": task["tag"], "attempt": self.attempt,
                   "retry_in_s": delay, "error": one_line(e),
                   "trace": traceback.format_exc(limit=3)})
        if self.stopping and self.attempt >= 3:
            # Flushing at exit: after a few attempts give up on this tag; it stays in the journal.
            self.pending.popleft()
            self.attempt = 0
