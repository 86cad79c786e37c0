"""One tracker behind a bounded queue and a thread of its own.

The loop only ever calls `put`, which never blocks: the tracker's start (W&B's service, an MLflow
server's answers), its sends and their retries all happen on the thread. A tracker that is down or
slower than training fills its queue; what does not fit is dropped and counted, with one WARNING
line per tracker, and the run's exit summary says how many points each tracker missed.

Steps only go forward. A resumed run trains again the steps between its checkpoint and where the
previous process stopped. Values at a step the tracker already holds are not sent (a point left with
none counts as `skipped`), so each curve has one point per step and never goes back: W&B refuses
those anyway, MLflow would draw both. What the tracker holds is what it
says (sinks.Sink.last_step: MLflow, W&B online), else this log dir's ledger, which records the
highest step handed to the tracker before it is sent (W&B offline runs cannot be asked; a step whose
send a kill cut off then stays out, rather than in twice).
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
    """The values logged at one step of one kind, names already prefixed ("train/loss").

    `catch_up`: a point about this start itself (run/restarts), recorded at the step it resumed
    from, which the tracker already holds: it goes in at the first step past what is held instead
    of being skipped."""

    step: int
    time: float
    values: dict[str, float]
    catch_up: bool = False


class Sink(Protocol):
    """A started tracker run."""

    def last_step(self) -> int | None:
        """The highest step the tracker holds for this run (-1: none, a new run), or None when it
        cannot tell (W&B offline)."""

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


class TrackerThread:
    """`put` points from the loop; the thread starts the sink, then sends in order."""

    def __init__(self, name: str, start: Callable[[], Sink], ledger: Ledger | None, *,
                 capacity: int = CAPACITY):
        """`ledger`: None for points that may arrive in any step order and are sent as they come
        (neox-eval's, one per checkpoint and task, which its results files already keep unique)."""
        self.name = name
        self.ledger = ledger
        self.sent = self.dropped = self.skipped = 0
        self.start = start
        self._capacity = capacity
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # the counts, written by both sides
        self._pending = 0  # points put and not yet sent, dropped or skipped
        self.dead = False  # the tracker failed to start: every point is dropped at once
        self._abandoned = False  # join gave up on it: the thread stops without sending more
        self._warned = False
        self._failed_run = False
        # What the tracker holds: every step up to `_held` (the previous process's newest, read
        # at start), and per name its newest step sent by this process.
        self._held = -1
        self._ledger_step = -1
        self._newest: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)
        self._thread.start()

    # -- the loop's side ---------------------------------------------------------------------------
    def put(self, point: Point) -> None:
        with self._lock:
            full = self.dead or self._pending >= self._capacity
            if full:
                self.dropped += 1
            else:
                self._pending += 1
        if not full:
            self._queue.put_nowait(point)
        elif not self.dead:
            self._warn("its queue is full: it takes points slower than training makes them")

    @property
    def pending(self) -> int:
        """Points queued or being sent."""
        return self._pending

    def finish(self, *, failed: bool = False) -> None:
        """No more points: the thread sends what is queued and ends the tracker run."""
        self._failed_run = failed
        self._queue.put_nowait(_CLOSE)  # the queue's own bound is ours (put), so this always fits

    def join(self, timeout_s: float) -> dict[str, int]:
        """Wait at most `timeout_s` for `finish` to be done; the counts. A tracker still busy then
        is abandoned: what it had not sent counts as dropped, and it sends nothing more (nor ends
        its run: a W&B finish could hold the exit)."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._lock:
                self._abandoned = True
                left, self._pending = self._pending, 0
                self.dropped += left
            if left:
                self._warn(f"{left} point(s) not sent within {timeout_s:.1f} s of the run's end",
                           during_run=False)
        return {"sent": self.sent, "dropped": self.dropped, "skipped": self.skipped}

    # -- the thread's side -------------------------------------------------------------------------
    def _warn(self, why: str, *, during_run: bool = True) -> None:
        if self._warned:
            return
        self._warned = True
        then = ("training goes on and the exit summary counts what it missed" if during_run
                else "the exit summary counts them")
        log.warning("tracker %s: dropping points, %s; %s", self.name, why, then)

    def _settle(self, *, sent: int = 0, dropped: int = 0, skipped: int = 0, taken: int = 0) -> bool:
        """Count what became of `taken` points; False when join abandoned the tracker (they were
        counted as dropped then)."""
        with self._lock:
            if self._abandoned:
                return False
            self.sent += sent
            self.dropped += dropped
            self.skipped += skipped
            self._pending -= taken
            return True

    def _run(self) -> None:
        try:
            sink = self.start()
            # The tracker's own answer is exact; the ledger (written before each send, so it may
            # name a step whose send a kill cut off) only stands in when the tracker cannot tell.
            held = None if self.ledger is None else sink.last_step()
            if held is None and self.ledger is not None:
                held = self.ledger.read()
        except Exception as e:  # noqa: BLE001 - any failure of a tracker's start is the tracker's
            with self._lock:
                self.dead = True
                left, self._pending = self._pending, 0
                self.dropped += left
            self._warn(f"it could not start ({_one_line(e)})")
            return
        self._held = self._ledger_step = -1 if held is None else held
        if self._held >= 0:
            log.info("tracker %s: the run holds steps up to %d; points up to there are not sent "
                     "again", self.name, self._held)
        while not self._abandoned:
            batch, closing = self._next_batch()
            points = batch if self.ledger is None else self._new(batch)
            skipped = len(batch) - len(points)
            try:
                if points:
                    self._write_ledger(max(p.step for p in points))
                    sink.log(points)
                if not self._settle(sent=len(points), skipped=skipped, taken=len(batch)):
                    return
            except Exception as e:  # noqa: BLE001 - a failed send costs these points only
                if not self._settle(dropped=len(points), skipped=skipped, taken=len(batch)):
                    return
                self._warn(f"a send failed ({_one_line(e)})")
            if closing:
                break
        if self._abandoned:
            return
        try:
            sink.close(failed=self._failed_run)
        except Exception as e:  # noqa: BLE001
            log.warning("tracker %s: ending its run failed: %s", self.name, _one_line(e))

    def _write_ledger(self, newest: int) -> None:
        # only upward: a late point (an asynchronous save's, at its own step) follows newer ones
        if self.ledger is not None and newest > self._ledger_step:
            self.ledger.write(newest)
            self._ledger_step = newest

    def _next_batch(self) -> tuple[list[Point], bool]:
        batch = [self._queue.get()]
        while len(batch) < BATCH and batch[-1] is not _CLOSE:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        closing = batch[-1] is _CLOSE
        return (batch[:-1] if closing else batch), closing

    def _new(self, points: list[Point]) -> list[Point]:
        """The points' values the tracker does not hold yet: none at or below the held step (the
        previous process's newest: a resume trains those steps again), and none of a name below its
        own newest step (an asynchronous save reports its step late, under names of its own; a name
        logged again at the same step, as the sync counters after the final flush, is an update).
        A point left with no values counts as skipped."""
        out = []
        for p in points:
            step = self._held + 1 if p.catch_up and p.step <= self._held else p.step
            values = {k: v for k, v in p.values.items()
                      if step > self._held and step >= self._newest.get(k, -1)}
            if values:
                self._newest.update(dict.fromkeys(values, step))
                out.append(Point(step, p.time, values))
        return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
