"""The trainer's one handle on publishing: `Publisher`.

The trainer calls `committed(tag)` right after a tag's local commit (every rank's files durable, the
marker and `latest` written), on every rank; only publishing ranks act (settings.py). Global rank 0
has claimed the prefix for this run before (`claim`, owner.py). A committed tag is journaled
({"queued": tag}, journal.py) and handed to this node's upload process (process.py), which publishes
it through the protocol (protocol.py) and reports each outcome back; with background uploads off the
same protocol runs here, inline.

Its contract, all non-blocking with the upload process:
  committed(tag)    after the tag is committed locally; journaled first, so a crash before the
                    upload finishes is picked up by the next run.
  poll()            applies the upload process's messages to the `PublishStatus` (status.py):
                    pending, published (verified remote, COMPLETE present), failed (for good: kept
                    locally), skipped, lag, bytes, retries; and starts a process that died again.
  close(timeout_s)  flush: wait for the queue to drain with a progress bar, bounded; returns what is
                    left. On a node other than 0 (node-local storage) the flush ends once its parts
                    are uploaded: they are `handed` to node 0, which publishes.

At start, a tag is handed to the new process when its last journal record is queued or failed, or
when it has none at all (a complete checkpoint that was never queued: a kill between the commit and
the journal line), provided it is still complete on disk.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neox_train.checkpoint.publish.fetch import verified_local_tags
from neox_train.checkpoint.publish.journal import (
    append_journal,
    crc_cache_path,
    journal_leftovers,
    journal_path,
    journal_queued,
)
from neox_train.checkpoint.publish.owner import Identity, check_start, claim
from neox_train.checkpoint.publish.process import STOP, run_upload_process
from neox_train.checkpoint.publish.protocol import Publication
from neox_train.checkpoint.publish.settings import PublishSettings, is_publishing_rank
from neox_train.checkpoint.publish.status import PublishStatus
from neox_train.config import RunConfig
from neox_train.distributed import Topology
from neox_train.errors import is_transient
from neox_train.log import log
from neox_train.remote import open_backend
from neox_train.remote.base import process_retries
from neox_train.remote.files import Crc32cCache

# A dead upload process is started again at once the first time, then after 5 s, 10 s, ... at most 5
# minutes.
WORKER_RESTART_WAIT_S = 5.0
WORKER_RESTART_WAIT_MAX_S = 300.0


def check_storage_access(run: RunConfig, topo: Topology, node_local: bool) -> None:
    """Prove credentials, bucket and write permission now (probe object written and deleted), not
    after hours of training. Raises StorageError with one line."""
    if run.sync_to is None or not is_publishing_rank(topo, node_local):
        return

    open_backend(run.sync_to, credentials=run.credentials).probe()


def check_prefix_owner(run: RunConfig, topo: Topology, run_id: str, *, takeover: bool) -> None:
    """Before anything expensive, on global rank 0: may this run publish to sync_to? PrefixOwned
    (one line) if another run owns it; the claim itself comes once the checkpoint is loaded
    (Publisher.claim)."""
    if run.sync_to is None or topo.rank != 0:
        return

    check_start(open_backend(run.sync_to, credentials=run.credentials, start_up=True), run_id,
                takeover=takeover)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Publisher:
    """Publishes this node's committed checkpoints. The upload process that dies (the OOM killer, a
    person's kill) is started again with every checkpoint it had not published, so one lost process
    does not end publishing for the rest of a days-long run; one that keeps dying is restarted after
    a doubling wait, and none of the trainer's calls raise or block because of it."""

    def __init__(self, settings: PublishSettings, *, enabled: bool = True):
        self.settings = settings
        # this rank uploads (settings.url "": nothing is published)
        self.enabled = enabled and bool(settings.url)
        self.status = PublishStatus()
        self._save_dir = Path(settings.save_dir)
        self._inline: Publication | None = None
        self._proc: Any = None  # the upload process (multiprocessing.Process), once started
        self._submitted: set[str] = set()
        # what was handed over, to hand over again after a death
        self._tasks_by_tag: dict[str, dict[str, Any]] = {}
        self._saving_now = False
        self._stopped = False  # close() or abort(): a dead process is expected from here on
        self._restart_at = 0.0  # monotonic time before which no new process is started
        self._restart_wait_s = 0.0
        self._owner: int | None = None  # the thread that started the process
        self._started = False
        # close() ran: a second one (the session's, after the loop's) returns the status
        self._closed = False
        if self.enabled and settings.background:
            self._new_process()  # tags committed before start() wait in its pipe

    @classmethod
    def for_run(cls, run: RunConfig, topo: Topology, *, node_local: bool,
                identity: Identity) -> Publisher:
        settings = PublishSettings.for_run(run, topo, node_local=node_local, run_id=identity.run_id,
                                           session=identity.session)
        return cls(settings, enabled=is_publishing_rank(topo, node_local))

    @property
    def identity(self) -> Identity:
        return Identity(self.settings.run_id, self.settings.session)

    # -- start -------------------------------------------------------------------------------------

    def claim(self, *, takeover: bool) -> None:
        """Global rank 0 makes this run the prefix's owner (before any upload). PrefixOwned if
        another run owns it and `takeover` is off."""
        if not self.settings.url or not self.settings.finalizes:
            return

        backend = self.settings.open_backend(start_up=True)
        warning = claim(backend, self.identity, takeover=takeover, save_dir=self.settings.save_dir)
        if warning:
            log.warning("sync: %s", warning)
        log.info("sync: run %s publishes to %s", self.settings.run_id, self.settings.url)

    def start(self, *, resume_journal: bool = True) -> list[str]:
        """Start publishing: the upload process (tags an interrupted earlier run left unpublished
        are queued first), or, inline, publish those now. Returns the tags taken from the
        journal."""
        if not self.enabled:
            return []
        leftover = (journal_leftovers(self._save_dir, self.settings.node_rank) if resume_journal
                    else [])
        if not self.settings.background:
            backend = self.settings.open_backend()
            backend.warn = lambda message: log.warning("sync: %s", message)
            cache = Crc32cCache(crc_cache_path(self._save_dir, self.settings.node_rank))
            self._inline = Publication(backend, self.settings, cache)
            self.status.published.extend(verified_local_tags(backend, self.settings))
            for tag in leftover:
                if tag not in self.status.published:
                    self._publish_inline(tag)
            return leftover
        self._launch()
        self._started = True
        # The process dies with the thread that started it (PR_SET_PDEATHSIG is per thread,
        # process.py), so only this thread, the trainer's main loop, ever starts a new one.
        self._owner = threading.get_ident()
        for tag in leftover:
            self._submit(tag, journal=False)
        if leftover:
            log.info("sync: resuming %d unfinished upload(s) from the journal: %s", len(leftover),
                     ", ".join(leftover))
        return leftover

    def _new_process(self) -> None:
        ctx = mp.get_context("spawn")
        # Pipes, not Queues: a Queue's semaphores leak (with a warning at exit) when the process has
        # to be killed. Messages are a few dozen bytes, far below the pipe buffer, so send() does
        # not block the loop.
        task_recv, self._tasks = ctx.Pipe(duplex=False)
        self._status, status_send = ctx.Pipe(duplex=False)
        self._saving = ctx.Event()
        if self._saving_now:
            self._saving.set()
        self._proc = ctx.Process(target=run_upload_process,
                                 args=(self.settings, task_recv, status_send, self._saving,
                                       os.getpid()),
                                 daemon=True, name=f"neox-sync-node{self.settings.node_rank}")

    def _launch(self) -> None:
        # The scheduler's SIGTERM (and Ctrl-C's SIGINT) go to the whole process group, and the
        # trainer owns shutdown: the process must ignore them from its first instruction, not from
        # when its own code runs (seconds later on a busy machine). A blocked signal stays blocked
        # across fork and exec, so the child starts with both held back; it ignores them, then
        # unblocks (process._detach_from_the_loop). Blocked in this thread only, and only during
        # start(): one sent meanwhile reaches the trainer right after.
        held = {signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # -- the loop's calls --------------------------------------------------------------------------

    def committed(self, tag: str, *, first: bool = False) -> None:
        """A tag is complete on local disk: journal it and hand it over, or upload it now when
        background uploads are off. `first`: before the older tags still queued (the preemption
        save, inside its budget)."""
        if not self.enabled:
            return
        if not self.settings.background:
            journal_queued(self._save_dir, self.settings.node_rank, tag)
            self._publish_inline(tag)
            return
        self._submit(tag, journal=True, first=first)

    def _submit(self, tag: str, *, journal: bool, first: bool = False) -> None:
        if tag in self._submitted:
            return
        if journal:
            journal_queued(self._save_dir, self.settings.node_rank, tag)
        self._submitted.add(tag)
        self.status.pending.append(tag)
        self._tasks_by_tag[tag] = {"tag": tag, "committed_at": time.time(), "first": first}
        self._send(self._tasks_by_tag[tag])
        self._restart_if_dead()

    def _send(self, msg: Any) -> None:
        try:
            self._tasks.send(msg)
        except (BrokenPipeError, OSError):
            pass  # the process is gone: _restart_if_dead hands the task to the next one

    def _publish_inline(self, tag: str) -> None:
        started = time.time()
        self.status.pending.append(tag)
        try:
            result = self._inline.publish(tag, timeout_s=self.settings.upload_timeout_s)
        # the upload process's policy: the checkpoint stays local
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.status.record_failed(tag, error)
            if not is_transient(e):
                append_journal(journal_path(self._save_dir, self.settings.node_rank),
                               {"failed": tag, "error": error, "time": time.time()})
            log.error("sync: cannot publish %s to %s inline (it stays on local disk): %s", tag,
                      self.settings.url, error)
            return
        self.status.record_published(tag, lag_s=time.time() - started,
                                     bytes_uploaded=result.bytes_uploaded,
                                     files_uploaded=result.files_uploaded,
                                     files_skipped=result.files_skipped)
        log.info("sync: published %s to %s inline (%d bytes, %.1f s)", tag, self.settings.url,
                 result.bytes_uploaded, self.status.last_lag_s)

    def hold_uploads(self, saving: bool) -> None:
        """While a save is written (in the loop or in the background), the upload process holds its
        next file: the save gets the disk and the cores (bounded by yield_to_save_max_s)."""
        self._saving_now = saving
        if self._proc is not None:
            (self._saving.set if saving else self._saving.clear)()

    def poll(self) -> PublishStatus:
        """Apply every message that has arrived (and restart a process that died); never blocks."""
        self._drain()
        self._restart_if_dead()
        return self.status

    def _drain(self) -> None:
        while self._started:
            try:
                if not self._status.poll(0):
                    break
                msg = self._status.recv()
            except (EOFError, OSError):
                break  # the process is gone
            self.status.apply(msg, self.settings.url)

    def _restart_if_dead(self) -> None:
        """A process that died while it was wanted is replaced (once the backoff allows) and handed
        every task not yet published, in the order they came, before anything new."""
        if (not self._started or self._stopped or self._proc.is_alive()
                or threading.get_ident() != self._owner):
            return
        code = self._proc.exitcode
        if code == 0:
            # it ended by itself: the trainer is gone, or it reported why it cannot go on ("fatal")
            return
        now = time.monotonic()
        if now < self._restart_at:
            return
        self._drain()  # what the dead process reported before it died still counts
        cause = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        self.status.worker_restarts += 1
        log.error("sync: the upload worker died (%s); starting it again with %d unpublished "
                  "checkpoint(s)%s", cause,
                  len(self.status.pending),
                  ": " + ", ".join(self.status.pending) if self.status.pending else "")
        self._new_process()
        self._launch()
        for tag in self.status.pending:
            self._send(self._tasks_by_tag[tag])
        # A process that dies again at once (a bug, no memory) is not respawned in a loop.
        self._restart_wait_s = min(max(2 * self._restart_wait_s, WORKER_RESTART_WAIT_S),
                                   WORKER_RESTART_WAIT_MAX_S)
        self._restart_at = now + self._restart_wait_s

    # -- what retention may delete -----------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The sync/* metrics; `retries` counts every retried storage request: the upload process's
        and this process's own (start-up probe, ownership checks, inline uploads)."""

        status = self.poll()
        return status.metrics(retries=status.worker_retries + process_retries())

    def may_delete(self, tag: str) -> bool:
        """Local retention deletes a tag only once it is verified remote (or when nothing is
        published)."""
        if not self.settings.url:
            return True
        if not self.enabled:
            return False  # this rank cannot know; publishing ranks do the deleting
        return tag in self.poll().published

    def verified_now(self) -> list[str]:
        """Local tags verified in the bucket, asked of the bucket now (what the upload process
        reported may not have arrived yet: a restart's first save comes before it). For making room
        on a full disk, so not on a hot path; [] when this rank does not upload or the bucket cannot
        answer."""
        if not self.enabled:
            return []
        known = list(self.poll().published)
        try:
            backend = self.settings.open_backend(start_up=True)
            known += verified_local_tags(backend, self.settings)
        # a bucket that cannot answer: nothing more is deleted
        except Exception as e:  # noqa: BLE001
            log.warning("sync: cannot check which local checkpoints are in %s: %s",
                        self.settings.url, e)
        return known

    # -- the end -----------------------------------------------------------------------------------

    def abort(self) -> None:
        """Stop the upload process now, without flushing: SIGKILL, because it ignores SIGTERM (the
        trainer owns shutdown) and may sit inside a request that the client retries for minutes;
        what it had not published stays in the journal."""
        self._stopped = True
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)

    def close(self, timeout_s: float | None = None, *, progress: bool = True,
              cutoff: Callable[[], float | None] | None = None) -> PublishStatus:
        """Flush: let the upload process finish every queued tag, up to timeout_s (upload_timeout_s
        unless told) and, once `cutoff()` names a monotonic time (a stop signal arrived meanwhile),
        up to then; then stop it. status.unpublished lists what was not published; the journal keeps
        it for the next run or neox-sync."""
        if not self._started or self._closed:
            return self.status
        self._closed = True
        timeout_s = self.settings.upload_timeout_s if timeout_s is None else timeout_s
        self.poll()  # a process that died gets its chance to flush too
        total = len(self.status.pending)
        if total:
            log.info("sync: waiting up to %.0f s for %d pending upload(s) to %s", timeout_s, total,
                     self.settings.url)
        self._stopped = True
        self._send(STOP)
        deadline = time.monotonic() + timeout_s
        bar = tqdm(total=total, desc="upload", unit="ckpt", disable=not progress or total == 0)
        while self._proc.is_alive() and time.monotonic() < deadline:
            limit = cutoff() if cutoff is not None else None
            if limit is not None:
                deadline = min(deadline, limit)
            self._proc.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            self._drain()
            bar.n = total - len(self.status.pending)
            bar.refresh()
        bar.close()
        self.abort()
        self._drain()
        if self.status.unpublished and cutoff is not None and cutoff() is not None:
            log.warning("sync: stopped by a signal during the upload flush: %s not published to %s "
                        "(journaled: the next start, or neox-sync --checkpoints, publishes them)",
                        ", ".join(self.status.unpublished), self.settings.url)
        return self.status
