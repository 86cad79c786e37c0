"""Our DeepSpeed checkpoint engine: every checkpoint file goes through writer.DirectFile, and in
asynchronous mode the loop waits only for the host snapshot while a background thread writes the
files.

Why not DeepSpeed's own engines (deepspeed/runtime/checkpoint_engine/):
- FastCheckpointEngine writes synchronously, inside save_checkpoint. Its fast writer needs the
  async_io op, which a pip-only machine has to JIT-build against libaio headers.
- DecoupledCheckpointEngine hands the live state dict to a spawned process through a queue:
  - it has no snapshot: on a GPU the child reads tensors the next steps are already changing, and on
    CPU the queue pickles the whole state in the loop anyway;
  - it waits for the files inside the next save's commit;
  - it crashed on CPU with ZeRO-2 (../shared/DEEPSPEED_NOTES.md).
- DataStates needs a package that is not on PyPI.

The engine keeps DeepSpeed's call order: create -> save per file -> commit. It only changes what
`save` and `commit` mean.
- Synchronous: `save` writes the file and returns its record.
- Asynchronous: `save` snapshots the state dict into reused host buffers (snapshot.py) and queues
  it; `commit` queues the end of the tag. One writer thread per rank writes the files in order and
  sets `WriteBatch.done`.

The local commit (marker, `latest`, upload) waits until every rank's batch is done: saver.py.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)

from neox_train.checkpoint.local.commit import FileRecord
from neox_train.checkpoint.local.snapshot import SnapshotPool, snapshot
from neox_train.checkpoint.local.writer import ChunkBuffers, DirectFile, torch_save
from neox_train.errors import one_line

ENGINE_NAME = "NeoxCheckpointEngine"
# Testing aid: the background writer sleeps this long before each file, so a test can kill -9 a rank
# or request the next save while a write is certainly in flight. Inert unless set.
WRITE_DELAY_ENV = "NEOX_TEST_WRITE_DELAY_S"
WRITER_NICE = 10


@dataclass
class WriteBatch:
    """One tag's files on this rank, as the writer reports them."""

    tag: str
    tag_dir: Path
    asynchronous: bool
    # relative path in the tag -> what was written
    records: dict[str, FileRecord] = field(default_factory=dict)
    error: str = ""  # one line: why this rank's files could not be written
    snapshot_s: float = 0.0
    snapshot_bytes: int = 0
    write_started: float = 0.0
    write_s: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def bytes_written(self) -> int:
        return sum(r.size for r in self.records.values())


_END = object()


class NeoxCheckpointEngine(CheckpointEngine):
    def __init__(self, *, zipfile_serialization: bool = True, pin_memory: bool = False):
        super().__init__()
        self.name = ENGINE_NAME
        self.zipfile_serialization = zipfile_serialization
        self.asynchronous = False  # chosen per save by the Saver
        self.pool = SnapshotPool(pin=pin_memory)
        self.buffers: ChunkBuffers | None = None  # allocated on the first save
        self.batch: WriteBatch | None = None
        self._clone_next = False
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- DeepSpeed's interface ---------------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo) -> None:
        self.batch = WriteBatch(info.tag, Path(info.save_dir) / info.tag, self.asynchronous)
        if not self.asynchronous:
            self.batch.write_started = time.perf_counter()

    def preserves_storage_sharing(self) -> bool:
        """DeepSpeed asks right before saving a state dict that it would clone (the module weights:
        views into flat buffers). In synchronous mode let it clone, as its own engine does. In
        asynchronous mode the snapshot makes the same compact copies into pooled buffers instead of
        fresh memory in the loop."""
        if not self.asynchronous:
            return True
        self._clone_next = True
        return False

    def save(self, state_dict: Any, path: str) -> None:
        compact, self._clone_next = self._clone_next, False
        batch = self.batch
        if batch is None:
            raise RuntimeError(f"{ENGINE_NAME}.save({path}) outside a checkpoint (no create)")
        if not batch.asynchronous:
            if not batch.error:
                self._write(batch, state_dict, Path(path))
            return
        started = time.perf_counter()
        snap, nbytes = snapshot(state_dict, self.pool, file_key=Path(path).name, compact=compact)
        batch.snapshot_s += time.perf_counter() - started
        batch.snapshot_bytes += nbytes
        self._ensure_thread()
        self._jobs.put((batch, snap, Path(path)))

    def commit(self, info: CheckpointCommitInfo) -> bool:
        """Asynchronous mode: the files are still being written; the writer sets batch.done after
        the last one."""
        batch = self.batch
        if batch is not None and batch.asynchronous:
            # a rank with no file of its own (ZeRO-0 beyond rank 0) still ends its batch
            self._ensure_thread()
            self._jobs.put((batch, _END, None))
        elif batch is not None:
            batch.write_s = time.perf_counter() - batch.write_started
            batch.done.set()
        return True

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    # -- writing -----------------------------------------------------------------------------------
    def _write(self, batch: WriteBatch, state: Any, path: Path) -> None:
        if self.buffers is None:
            self.buffers = ChunkBuffers()
        rel = path.relative_to(batch.tag_dir).as_posix()
        out = None
        try:
            out = DirectFile(path, self.buffers)
            torch_save(state, out, zipfile_serialization=self.zipfile_serialization)
            batch.records[rel] = out.close()
        # reported to every rank by the Saver, which raises one line
        except Exception as e:  # noqa: BLE001
            if out is not None:
                out.abort()
            batch.error = f"{rel}: {one_line(e)}"

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._writer_loop, name="neox-ckpt-writer",
                                            daemon=True)
            self._thread.start()

    def _writer_loop(self) -> None:
        try:
            # Below the training threads (nice is per thread on Linux, and the chunk writers inherit
            # it): where the host cores also train (CPU runs, the data loader) the loop wins and the
            # write takes the idle time.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: the writer runs at the loop's priority
        while True:
            batch, state, path = self._jobs.get()
            if state is _END:
                if batch.write_started:
                    batch.write_s = time.perf_counter() - batch.write_started
                batch.done.set()
                continue
            try:
                if not batch.write_started:
                    batch.write_started = time.perf_counter()
                delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
                if delay:
                    time.sleep(delay)
                # after a failed file the rest of the tag is not written (it is removed anyway)
                if not batch.error:
                    self._write(batch, state, path)
            # the thread must live to set `done`, or every rank waits forever
            except Exception as e:  # noqa: BLE001
                batch.error = batch.error or f"{path}: {one_line(e)}"
            # the snapshot's tensors are pooled buffers: dropping the dict frees nothing big
            del state

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current batch is written (True), or until `timeout` (False)."""
        return self.batch is None or self.batch.done.wait(timeout)


def install(engine, *, pin_memory: bool) -> NeoxCheckpointEngine:
    """Replace the DeepSpeed engine's checkpoint engine with ours, keeping its serialization
    setting."""
    zipfile = getattr(engine.checkpoint_engine, "zipfile_serialization", True)
    ours = NeoxCheckpointEngine(zipfile_serialization=zipfile, pin_memory=pin_memory)
    engine.checkpoint_engine = ours
    return ours
