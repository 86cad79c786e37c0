"""The background checkpoint sync: a spawn-started process per node that uploads finished checkpoints and
publishes them (manifest, COMPLETE, `latest`), while the training loop never waits on it.

Why a process and not a thread: hashing and HTTP in Python hold the GIL in bursts; in the training process they
would steal time from the step that feeds the GPU. Why spawn: a forked child would inherit CUDA and NCCL state
and the gRPC/HTTP sessions of the parent, none of which survive a fork; the storage client is created in the
child after it starts.

Contract with the trainer (all non-blocking):
  submit(tag)       after `save_checkpoint` has returned on every rank (its final barrier): every rank's files of
                    this node are on disk. Also appended to the journal, so a crash before the upload finishes is
                    picked up by the next run.
  poll()            drains status messages: pending tags, published tags (verified remote, COMPLETE present),
                    lag, bytes, retries, failures.
  close(timeout_s)  flush: wait for the queue to drain with a progress bar, bounded; returns what is left.

Journal (SAVE_DIR/.neox-sync/journal-node<k>.jsonl, append-only JSON lines): {"queued": tag} written by the
trainer before the task is handed over, {"published": tag} / {"skipped": tag} by the worker. Pending = queued
minus published minus skipped, for tags still on disk.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import step_of_tag
from .metrics import log

JOURNAL_DIR = ".neox-sync"
_STOP = "__stop__"


@dataclass(frozen=True)
class SyncSettings:
    """What the worker needs; plain data so it crosses the spawn boundary."""

    url: str
    save_dir: str
    credentials: str | None = None
    node_rank: int = 0
    num_nodes: int = 1  # nodes whose parts make one checkpoint (node-local storage), else 1
    publisher: bool = True  # finalizes (manifest, COMPLETE, latest): global rank 0's worker
    workers: int = 8
    max_pending: int = 0  # >0: when more are waiting, superseded pending tags are skipped (kept locally)
    run_id: str | None = None  # the same on every node of one run: parts from another run are never merged
    retry_initial_s: float = 2.0
    retry_max_s: float = 60.0
    finalize_poll_s: float = 1.0
    # While the trainer writes a checkpoint, uploads wait (at most this long per wait) so that they do not compete
    # with the save for the disk and the cores: the loop's stall is the one cost that reaches the GPUs.
    yield_to_save_max_s: float = 120.0


@dataclass
class SyncStatus:
    pending: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    last_published_step: int = -1
    last_lag_s: float = float("nan")
    bytes_uploaded: int = 0
    files_uploaded: int = 0
    files_skipped: int = 0
    retries: int = 0  # request-level retries inside the storage client (503s, resets, timeouts)
    failures: int = 0  # whole-checkpoint attempts that failed and were retried by the worker
    last_error: str = ""
    alive: bool = True

    def record_published(self, tag: str, *, lag_s: float, bytes_uploaded: int, files_uploaded: int,
                         files_skipped: int, retries: int) -> None:
        if tag in self.pending:
            self.pending.remove(tag)
        self.published.append(tag)
        self.last_published_step = max(self.last_published_step, step_of_tag(tag) or -1)
        self.last_lag_s = lag_s
        self.bytes_uploaded += bytes_uploaded
        self.files_uploaded += files_uploaded
        self.files_skipped += files_skipped
        self.retries += retries

    def metrics(self) -> dict[str, float]:
        return {
            "pending": float(len(self.pending)),
            "last_published_step": float(self.last_published_step),
            "lag_s": self.last_lag_s,
            "bytes_uploaded": float(self.bytes_uploaded),
            "retries": float(self.retries),
            "failures": float(self.failures),
        }


def journal_path(save_dir: Path, node_rank: int) -> Path:
    return Path(save_dir) / JOURNAL_DIR / f"journal-node{node_rank}.jsonl"


def append_journal(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record) + "\n"
    # One small O_APPEND write: atomic with respect to the other process appending to the same file. No fsync:
    # the page cache survives a killed process, which is what the journal is for, and on ext4 an fsync right
    # after a checkpoint write waits for that checkpoint's writeback (measured: ~15 ms added to every save).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def journal_pending(save_dir: Path, node_rank: int) -> list[str]:
    """Tags queued by an earlier run (or this one) and neither published nor skipped, still on disk, oldest first."""
    path = journal_path(save_dir, node_rank)
    if not path.is_file():
        return []
    queued: dict[str, None] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill -9 mid-write
        if "queued" in rec:
            queued[rec["queued"]] = None
        for done in (rec.get("published"), rec.get("skipped")):
            queued.pop(done, None)
    tags = [t for t in queued if (Path(save_dir) / t).is_dir()]
    return sorted(tags, key=lambda t: step_of_tag(t) or 0)


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
        self._proc = ctx.Process(target=_worker_main, args=(settings, task_recv, status_send, self._saving),
                                 daemon=True, name=f"neox-sync-node{settings.node_rank}")
        self.status = SyncStatus()
        self._submitted: set[str] = set()

    def start(self, *, resume_journal: bool = True) -> list[str]:
        """Start the process; tags an interrupted earlier run left unpublished are queued first."""
        self._proc.start()
        leftover = journal_pending(Path(self.settings.save_dir), self.settings.node_rank) if resume_journal else []
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
            append_journal(journal_path(Path(self.settings.save_dir), self.settings.node_rank),
                            {"queued": tag, "time": committed_at})
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
                break  # the worker is gone; status.alive says so below
            self._apply(msg)
        self.status.alive = self._proc.is_alive()
        return self.status

    def _apply(self, msg: dict[str, Any]) -> None:
        st = self.status
        kind = msg["kind"]
        if kind == "published":
            tag = msg["tag"]
            st.record_published(tag, lag_s=msg["lag_s"], bytes_uploaded=msg["bytes_uploaded"],
                                files_uploaded=msg["files_uploaded"], files_skipped=msg["files_skipped"],
                                retries=msg["retries"])
            log.info("sync: published %s to %s (%d files, %d bytes uploaded, lag %.1f s)", tag, self.settings.url,
                     msg["files_uploaded"], msg["bytes_uploaded"], msg["lag_s"])
        elif kind == "skipped":
            tag = msg["tag"]
            if tag in st.pending:
                st.pending.remove(tag)
            st.skipped.append(tag)
            log.warning("sync: skipped superseded checkpoint %s (backlog over max_pending); it stays on local disk", tag)
        elif kind == "failure":
            st.failures += 1
            st.last_error = msg["error"]
            log.warning("sync: %s failed (attempt %d, retrying in %.0f s): %s", msg["tag"], msg["attempt"],
                        msg["retry_in_s"], msg["error"])
        elif kind == "fatal":
            st.last_error = msg["error"]
            log.error("sync: worker cannot continue: %s", msg["error"])

    def close(self, timeout_s: float, *, progress: bool = True) -> SyncStatus:
        """Flush: let the worker finish every queued tag, up to timeout_s; then stop it. Returns the final status
        (status.pending lists what was not published; the journal keeps it for the next run or neox-sync)."""
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
        self.status.alive = False
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


def _worker_main(settings: SyncSettings, tasks, status_q, saving=None) -> None:  # tasks: recv end; status_q: send end
    """Runs in the spawned process. Never raises: failures are reported and retried."""
    from .storage import Crc32cCache, StorageError, open_backend

    import signal

    # The trainer owns shutdown: on SIGTERM/Ctrl-C (sent to the whole process group) it saves, then flushes this
    # queue with a bounded wait and stops us itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
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
    save_dir = Path(settings.save_dir)
    jpath = journal_path(save_dir, settings.node_rank)
    try:
        backend = open_backend(settings.url, credentials=settings.credentials)
    except Exception as e:  # noqa: BLE001 - reported to the trainer, which checked access at start-up already
        status_q.send({"kind": "fatal", "error": f"{type(e).__name__}: {e}"})
        return
    cache = Crc32cCache(save_dir / JOURNAL_DIR / f"crc32c-node{settings.node_rank}.json")
    gate = save_gate(saving, settings.yield_to_save_max_s) if saving is not None else None
    pending: deque[dict[str, Any]] = deque()
    stopping = False
    attempt = 0
    next_try = 0.0

    while True:
        # Take everything queued; block only when there is nothing to do.
        block = not pending and not stopping
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
        if stopping and not pending:
            return
        if os.getppid() != parent:
            return  # the trainer died (kill -9): what is unpublished stays in the journal for the next run
        if not pending:
            continue
        if settings.max_pending and len(pending) > settings.max_pending:
            # Keep the oldest (it may be mid-upload across retries) and the newest; drop what lies between.
            while len(pending) > settings.max_pending and len(pending) > 2:
                dropped = pending[1]
                del pending[1]
                append_journal(jpath, {"skipped": dropped["tag"], "time": time.time()})
                status_q.send({"kind": "skipped", "tag": dropped["tag"]})
        if time.monotonic() < next_try:
            time.sleep(min(0.5, next_try - time.monotonic()))
            continue
        task = pending[0]
        tag = task["tag"]
        try:
            if not (save_dir / tag).is_dir():
                raise StorageError(f"checkpoint folder {save_dir / tag} disappeared before it was uploaded")
            result = publish_tag(backend, settings, tag, cache, gate=gate)
        except Exception as e:  # noqa: BLE001 - one failure must never kill the worker
            attempt += 1
            delay = min(settings.retry_max_s, settings.retry_initial_s * 2 ** (attempt - 1))
            next_try = time.monotonic() + delay
            status_q.send({"kind": "failure", "tag": tag, "attempt": attempt, "retry_in_s": delay,
                          "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:500],
                          "trace": traceback.format_exc(limit=3)})
            if stopping and attempt >= 3:
                # Flushing at exit: after a few attempts give up on this tag; it stays in the journal.
                pending.popleft()
                attempt = 0
            continue
        attempt = 0
        pending.popleft()
        status_q.send({
            "kind": "published", "tag": tag, "lag_s": time.time() - task["committed_at"],
            "bytes_uploaded": result.bytes_uploaded, "files_uploaded": result.files_uploaded,
            "files_skipped": result.files_skipped, "retries": result.retries,
        })


def publish_tag(backend, settings: SyncSettings, tag: str, cache, *, gate=None):
    """Upload this node's part of `tag`, wait until the checkpoint is published (COMPLETE in the bucket), and
    journal it. One path for the background worker and for inline uploads; returns the SyncResult.
    gate: called before each file is read (the worker's wait while a checkpoint is being written)."""
    from .sync import upload_checkpoint_part

    result = upload_checkpoint_part(Path(settings.save_dir), tag, backend, node_rank=settings.node_rank,
                                    workers=settings.workers, cache=cache, run_id=settings.run_id, gate=gate)
    cache.save()
    _wait_published(backend, tag, settings)
    append_journal(journal_path(Path(settings.save_dir), settings.node_rank), {"published": tag, "time": time.time()})
    return result


def _wait_published(backend, tag: str, settings: SyncSettings) -> None:
    """The publisher finalizes once every node's part is remote; other nodes wait until COMPLETE exists, so that
    'published' always means a complete, verified checkpoint in the bucket."""
    from .sync import COMPLETE, finalize_checkpoint

    while True:
        if settings.publisher:
            if finalize_checkpoint(backend, tag, num_nodes=settings.num_nodes):
                return
        elif backend.read_bytes(f"{tag}/{COMPLETE}") is not None:
            return
        time.sleep(settings.finalize_poll_s)
