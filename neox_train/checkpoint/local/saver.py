"""A save from the trainer's side: start it (the loop waits only for the snapshot when it is
asynchronous), learn at a step boundary that every rank's files are durable, then commit it. At most
one save is in flight.

The protocol, on top of the local commit (commit.py):

  1. every rank: `begin` waits for the save still in flight, if any (`in_flight_wait_s`). The
     folder's owner clears the tag. Then `engine.save_checkpoint(save_latest=False)` runs through
     our checkpoint engine:
     - synchronous: the files are written, fsynced and hashed before it returns;
     - asynchronous: the state is snapshotted into host buffers and a writer thread writes the
       files.
  2. every step, the ranks sum "still writing" over the control group (distributed.Control, with the
     stop flag);
  3. when nobody is writing, every rank calls `finish` at the same step. The ranks exchange their
     files' records (size, crc32c, mtime) and errors. The owner writes the side files and the
     completeness marker from the records of the files in its own folder (no file is read again),
     then `latest`. Only then does the trainer hand the tag to the upload worker.

A kill -9 at any point before the marker leaves the tag without one: resume never uses it,
publication never sees it, and `latest` still names the previous complete checkpoint. A failed write
on any rank removes the partial tag and raises the same one-line CheckpointError on every rank.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.checkpoint_engine import NeoxCheckpointEngine, WriteBatch
from neox_train.checkpoint.local.snapshot import available_host_memory
from neox_train.checkpoint.local.tags import tag_for_step
from neox_train.checkpoint.local.train_state import prepare_tag, save_failed, write_side_files
from neox_train.distributed import Control
from neox_train.ds_config import SNAPSHOT_MEMORY_SHARE
from neox_train.errors import CheckpointError
from neox_train.log import log
from neox_train.units import human_bytes


@dataclass(frozen=True)
class SaveResult:
    """A committed save: what the loop lost to it and how fast the files went to disk."""

    tag: str
    # the committed tag on the folder's owner, None on the other ranks
    status: commit.TagStatus | None
    # the loop was blocked: waiting for the previous save, snapshot or write, hand-offs
    stall_s: float
    in_flight_wait_s: float  # the part of stall_s spent waiting for the previous save
    write_s: float  # the slowest rank's background (or inline) writing
    bytes_written: int  # all ranks together
    asynchronous: bool

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / 1e9 / self.write_s if self.write_s > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {"stall_s": self.stall_s, "write_s": self.write_s, "gb_per_s": self.gb_per_s,
                "in_flight_wait_s": self.in_flight_wait_s, "bytes": float(self.bytes_written),
                "async": float(self.asynchronous)}


def choose_async(wanted: bool, snapshot_bytes_per_node: int) -> bool:
    """Asynchronous saves when asked for and the snapshot fits in host memory; else synchronous,
    with one WARNING."""
    if not wanted:
        return False
    available = available_host_memory()
    if snapshot_bytes_per_node <= SNAPSHOT_MEMORY_SHARE * available:
        return True
    log.warning("checkpoints are saved synchronously (the loop waits for the disk): an "
                "asynchronous save needs about %s of host memory per node for its snapshot, %s is "
                "available (async_save uses at most %.0f%%)",
                human_bytes(snapshot_bytes_per_node), human_bytes(available),
                100 * SNAPSHOT_MEMORY_SHARE)
    return False


class Saver:
    def __init__(self, ds_engine, ckpt_engine: NeoxCheckpointEngine, save_dir: Path, *, owner: bool,
                 run_id: str | None, control: Control, asynchronous: bool, disk: int = 0):
        self.ds_engine = ds_engine
        self.ckpt = ckpt_engine
        self.save_dir = Path(save_dir)
        self.owner = owner
        self.run_id = run_id
        self.control = control
        self.asynchronous = asynchronous
        # Which folder this rank's files land in (publisher.folder_node). With node-local storage
        # every node's local rank 0 writes files of the same names (the model states) with other
        # bytes.
        self.disk = disk
        # the save being written: tag, batch, side-file inputs, timings
        self._flight: dict[str, Any] | None = None
        self._waited_early = 0.0  # wait_written() before begin(): part of in_flight_wait_s

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    def writing(self) -> int:
        """1 while this rank's files of the save in flight are still being written (the per-step
        agreement)."""
        return int(self._flight is not None and not self._flight["batch"].done.is_set())

    def wait_written(self) -> None:
        """Wait until this rank's files of the save in flight are on disk (begin() waits for them
        anyway): what the disk holds is then what that save leaves. The wait counts as the next
        save's in_flight_wait_s."""
        if self._flight is not None:
            started = time.perf_counter()
            self._flight["batch"].done.wait()
            self._waited_early += time.perf_counter() - started

    def begin(self, step: int, extra: dict[str, Any], *, losses: dict[str, Any],
              expected_bytes: int | None, asynchronous: bool | None = None) -> SaveResult | None:
        """Start saving `step` on every rank. Returns the previous save's result when this call had
        to finish it first (its in_flight_wait_s says how long that took); a synchronous save is
        finished by `finish()` at once by the caller."""
        previous = None
        waited, self._waited_early = self._waited_early, 0.0
        if self._flight is not None:
            started = time.perf_counter()
            self._flight["batch"].done.wait()
            waited += time.perf_counter() - started
            previous = self.finish()
        started = time.perf_counter()
        tag = tag_for_step(step)
        refused: CheckpointError | None = None
        if self.owner:
            try:
                prepare_tag(self.save_dir, tag)
            except CheckpointError as e:
                refused = e
        # every rank stops, none waits in DeepSpeed's barrier
        if self.control.sum([int(refused is not None)])[0]:
            raise refused or CheckpointError(f"cannot save checkpoint {tag}: the rank that owns "
                                             f"its folder refused (its log says why)")
        self.ckpt.asynchronous = self.asynchronous if asynchronous is None else asynchronous
        try:
            self.ds_engine.save_checkpoint(str(self.save_dir), tag=tag, client_state=extra,
                                           save_latest=False)
        # DeepSpeed's own writes (folders, its recovery script) can fail too
        except (OSError, RuntimeError) as e:
            if self.owner:
                shutil.rmtree(self.save_dir / tag, ignore_errors=True)
            raise save_failed(self.save_dir, tag, e, expected_bytes) from e
        batch: WriteBatch = self.ckpt.batch
        self._flight = {"tag": tag, "batch": batch, "extra": extra, "losses": dict(losses),
                        "expected": expected_bytes, "blocked": time.perf_counter() - started,
                        "waited": waited}
        return previous

    def wait_and_finish(self) -> SaveResult:
        """Block until this rank's files are written, then finish the save (every rank calls this at
        one point)."""
        self._flight["batch"].done.wait()
        return self.finish()

    def finish(self) -> SaveResult:
        """Commit the save in flight; every rank calls it at the same step, once no rank is
        writing."""
        flight, self._flight = self._flight, None
        started = time.perf_counter()
        batch: WriteBatch = flight["batch"]
        # Immediate when the agreement said so; were a caller ever to call early, this rank still
        # reports only files it has finished (a marker listing a half-written set would be a torn
        # checkpoint).
        batch.done.wait()
        tag, tag_dir = flight["tag"], self.save_dir / flight["tag"]
        reports = self.control.gather({"error": batch.error, "records": batch.records,
                                       "write_s": batch.write_s, "bytes": batch.bytes_written,
                                       "disk": self.disk})
        errors = [r["error"] for r in reports if r["error"]]
        status = None
        if errors:
            if self.owner:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise save_failed(self.save_dir, tag, errors[0], flight["expected"])
        failure: CheckpointError | None = None
        if self.owner:
            # Only the records of files in this folder: another node's record of its own copy (same
            # name, same size, and within one tick of the file clock the same mtime) would put its
            # crc32c in this marker.
            known: dict[str, commit.FileRecord] = {}
            for r in reports:
                if r["disk"] == self.disk:
                    known.update(r["records"])
            try:
                write_side_files(tag_dir, flight["extra"], run_id=self.run_id,
                                 losses=flight["losses"])
                status = commit.commit(self.save_dir, tag, run_id=self.run_id, known=known)
            except OSError as e:
                shutil.rmtree(tag_dir, ignore_errors=True)
                failure = save_failed(self.save_dir, tag, e, flight["expected"])
        # The owner's commit can fail alone (its disk): every rank stops with the same line.
        failed = [f for f in self.control.gather(str(failure) if failure else "") if f]
        if failed:
            raise failure or CheckpointError(failed[0])
        return SaveResult(
            tag=tag, status=status,
            stall_s=flight["blocked"] + flight["waited"] + time.perf_counter() - started,
            in_flight_wait_s=flight["waited"], write_s=max(r["write_s"] for r in reports),
            bytes_written=sum(r["bytes"] for r in reports), asynchronous=batch.asynchronous)
