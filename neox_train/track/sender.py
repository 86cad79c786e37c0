"""One tracker behind a bounded queue and a thread of its own.

The loop only ever calls `put`, which never blocks: the tracker's start (W&B's service, an MLflow
server's answers), its sends and their retries all happen on the thread. A tracker that is down or
slower than training fills its queue; what does not fit is dropped and counted, with one WARNING
line per tracker, and the run's exit summary says how many points each tracker missed.

Steps only go forward. A resumed run trains again the steps between its checkpoint and where the
previous process stopped; a rollback does the same within one process. Values at a step the tracker
already holds are skipped (a point with any skipped counts as `skipped`), so each curve has one
point per step and never goes back: W&B refuses those anyway, MLflow would draw both. What the
tracker already holds is
the larger of what it says (sinks.Sink.last_step) and this log dir's ledger, which records the
highest step handed to the tracker before it is sent (W&B offline runs cannot be asked).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from neox_train.log import log

# Points waiting per tracker: a log step sends one point per kind (train, eval, sync), so this is
# hours of a run logging every 10 s before anything is dropped.
CAPACITY = 4096
# One send carries at most this many points (MLflow's log_batch takes 1000 metrics).
BATCH = 64


@dataclass(frozen=True)
class Point:
    """The values logged at one step of one kind, names already prefixed ("train/loss")."""

    step: int
    time: float
    values: dict[str, float]


class Sink(Protocol):
    """A started tracker run."""

    def last_step(self) -> int | None:
        """The highest step the tracker already holds for this run (a resume), None if unknown."""

    def log(self, points: list[Point]) -> None: ...

    def close(self, *, failed: bool) -> None: ...


class Ledger:
    """LOG_DIR/trackers/NAME.json: the highest step handed to a tracker run, written before the
    send, so a process killed mid-send leaves a step at least as high as what the tracker got."""

    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id = path, run_id

    def read(self) -> int | None:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        step = record.get("step") if isinstance(record, dict) else None
        return step if record.get("run_id") == self.run_id and isinstance(step, int) else None

    def write(self, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"run_id": self.run_id, "step": step}) + "\n")
        os.replace(tmp, self.path)


_CLOSE = object()


@dataclass(frozen=True)
class _Hold:
    step: int


class TrackerThread:
    """`put` points from the loop; the thread starts the sink, then sends in order."""

    def __init__(self, name: str, start: Callable[[], Sink], ledger: Ledger | None, *,
                 capacity: int = CAPACITY):
        """`ledger`: None for points that may arrive in any step order and are sent as they come
        (neox-eval's, one per checkpoint and task, which its results files already keep unique)."""
        self.name = name
        self.ledger = ledger
        self.sent = self.dropped = self.skipped = 0
        self._start = start
        self._capacity = capacity
        self._queue: queue.Queue = queue.Queue()
        self._dead = False  # the tracker failed to start: every point is dropped at once
        self._warned = False
        self._failed_run = False
        # Steps already held: everything up to `_held` (the previous process's, read at start),
        # and per name its newest step sent by this process.
        self._held = -1
        self._newest: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)
        self._thread.start()

    # -- the loop's side ---------------------------------------------------------------------------
    def put(self, point: Point) -> None:
        if self._dead:
            self.dropped += 1
            return
        if self._queue.qsize() >= self._capacity:
            self._drop(1, "its queue is full: it takes points slower than training makes them")
        else:
            self._queue.put_nowait(point)

    def hold(self, step: int) -> None:
        """The tracker holds every step up to `step` (a rollback will train them again)."""
        self._queue.put_nowait(_Hold(step))

    def finish(self, *, failed: bool = False) -> None:
        """No more points: the thread sends what is queued and ends the tracker run."""
        self._failed_run = failed
        self._queue.put_nowait(_CLOSE)  # the queue's own bound is ours (put), so this always fits

    def join(self, timeout_s: float) -> dict[str, int]:
        """Wait at most `timeout_s` for `finish` to be done; the counts (what is still queued then
        counts as dropped)."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            left = self._queue.qsize()
            if left:
                self._drop(left, f"it had not taken them {timeout_s:.0f} s after the run ended")
        return {"sent": self.sent, "dropped": self.dropped, "skipped": self.skipped}

    # -- the thread's side -------------------------------------------------------------------------
    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if not self._warned:
            self._warned = True
            log.warning("tracker %s: dropping points, %s; training goes on and the exit summary "
                        "counts what it missed", self.name, why)

    def _run(self) -> None:
        try:
            sink = self._start()
            held = ([] if self.ledger is None else
                    [s for s in (sink.last_step(), self.ledger.read()) if s is not None])
        except Exception as e:  # noqa: BLE001 - any failure of a tracker's start is the tracker's
            self._dead = True
            self._drop(0, f"it could not start ({_one_line(e)})")
            self._drain_dead()
            return
        self._held = max(held, default=-1)
        self._ledger_step = self._held
        if self._held >= 0:
            log.info("tracker %s: the run holds steps up to %d; points up to there are not sent "
                     "again", self.name, self._held)
        while True:
            batch, closing = self._next_batch()
            points = ([p for p in batch if isinstance(p, Point)] if self.ledger is None
                      else self._new(batch))
            if points:
                try:
                    newest = max(p.step for p in points)
                    if self.ledger is not None and newest > self._ledger_step:
                        # only upward: a late point (an async save's, at its own step) follows
                        # newer ones
                        self.ledger.write(newest)
                        self._ledger_step = newest
                    sink.log(points)
                    self.sent += len(points)
                except Exception as e:  # noqa: BLE001 - a failed send costs these points only
                    self._drop(len(points), f"a send failed ({_one_line(e)})")
            if closing:
                break
        try:
            sink.close(failed=self._failed_run)
        except Exception as e:  # noqa: BLE001
            log.warning("tracker %s: ending its run failed: %s", self.name, _one_line(e))

    def _next_batch(self) -> tuple[list[Point], bool]:
        batch = [self._queue.get()]
        while len(batch) < BATCH and batch[-1] is not _CLOSE:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        closing = batch[-1] is _CLOSE
        return (batch[:-1] if closing else batch), closing

    def _new(self, points: list) -> list[Point]:
        """The points' values the tracker does not hold yet: none at or below the held step (the
        previous process's newest, a rollback's), and none of a name below its own newest step
        (an asynchronous save reports its step late, under names of its own; a name logged again at
        the same step, as the sync counters after the final flush, is an update)."""
        out = []
        for p in points:
            if isinstance(p, _Hold):
                self._held = max(self._held, p.step)
                continue
            values = {k: v for k, v in p.values.items()
                      if p.step > self._held and p.step >= self._newest.get(k, -1)}
            if len(values) < len(p.values):
                self.skipped += 1
            if values:
                self._newest.update(dict.fromkeys(values, p.step))
                out.append(Point(p.step, p.time, values))
        return out

    def _drain_dead(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            self.dropped += isinstance(item, Point)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
