"""The hang watchdog: a thread in every rank that sees the step counter and ends a rank that stopped
making progress.

A collective that never completes (one rank stuck, the others waiting inside NCCL or gloo) freezes a
job without a word. Here, when no optimizer step completes within the allowance, the watchdog writes
every thread's Python stack of this rank to the log (faulthandler), marks the rank hung in its
status file and exits it with HANG_EXIT_CODE (75), so the supervisor
(`neox-launch --max-restarts N`) knows it was a hang and restarts the job.

The allowance (`hang_timeout_s`; null = automatic):
- between steps: hang_timeout_s, or automatically the larger of 10x the median step time and 5
  minutes;
- the first step of a start (process group, checkpoint load, the engine, compilation, the first
  step): 3x hang_timeout_s (automatic: 3x 5 minutes), plus 30 minutes with torch.compile;
- around a save, an evaluation or a rollback: the base plus the larger of the base and 4x the
  longest one so far.
The process group's collective timeout is set above every allowance (`collective_timeout_s`), so a
stuck collective ends as a watchdog exit with stacks, never as a silent 30-minute wait or as a
collective error without them.

The same thread writes this rank's status file for the supervisor (health.py) about once a second.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

from neox_train import health
from neox_train.log import log

AUTO_FLOOR_S = 300.0  # 5 minutes: the automatic allowance never goes below it
AUTO_MEDIAN_FACTOR = 10.0
FIRST_STEP_FACTOR = 3.0
COMPILE_EXTRA_S = 1800.0
PHASE_FACTOR = 4.0
COLLECTIVE_MARGIN_S = 120.0
HEARTBEAT_S = 5.0


@dataclass(frozen=True)
class HangLimits:
    """The allowances derived from the run config (see the module docstring)."""

    fixed_s: float | None  # hang_timeout_s, or None: automatic
    first_step_s: float
    collective_s: float  # the process group's timeout: above every allowance

    @classmethod
    def from_run(cls, run) -> "HangLimits":
        base = run.hang_timeout_s if run.hang_timeout_s is not None else AUTO_FLOOR_S
        first = FIRST_STEP_FACTOR * base + (COMPILE_EXTRA_S if run.compile else 0.0)
        # Between steps an allowance is at most 2 x the base plus 4 x the longest phase; capped just
        # below this.
        collective = max(first, PHASE_FACTOR * base) + COLLECTIVE_MARGIN_S
        return cls(run.hang_timeout_s, first, collective)

    def describe(self) -> str:
        base = f"{self.fixed_s:g} s" if self.fixed_s is not None else \
            f"max({AUTO_MEDIAN_FACTOR:g}x the median step, {AUTO_FLOOR_S:g} s)"
        return (f"a rank that completes no optimizer step within {base} ({self.first_step_s:g} s "
                "for the first step) prints its stacks and exits with code "
                f"{health.HANG_EXIT_CODE}; collective timeout {self.collective_s:g} s")


class Watchdog:
    """Armed by start(); beat(step) after every optimizer step; phase(name) around saves,
    evaluations, rollbacks; disarm(...) where waiting is bounded otherwise (the final upload
    flush)."""

    def __init__(self, limits: HangLimits, *, rank: int, poll_s: float = 1.0):
        self.limits = limits
        self.rank = rank
        self.poll_s = poll_s
        self._root = health.status_dir()
        self.status = health.RankStatus(rank=rank, attempt=health.attempt())
        self._step_times: deque[float] = deque(maxlen=50)
        self._longest: dict[str, float] = {}
        self._last = time.monotonic()  # the newest step, phase end or start
        self._phase: str | None = None
        self._phase_started = 0.0
        self._stepped = False  # a step completed in this process
        self._armed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written = 0.0
        self._dirty = True

    # -- the main thread's side --------------------------------------------------------------------
    def start(self) -> "Watchdog":
        self._last = time.monotonic()
        self._armed = True
        self._thread = threading.Thread(target=self._run, name="neox-watchdog", daemon=True)
        self._thread.start()
        return self

    def started_at_step(self, step: int) -> None:
        self.status.start_step = self.status.step = step
        self.status.state = "training"
        self._dirty = True

    def beat(self, step: int) -> None:
        now = time.monotonic()
        if self._phase is None:
            self._step_times.append(now - self._last)
        self._last = now
        self._stepped = True
        status = self.status
        status.step = step
        status.progress_at = time.time()
        if status.first_step_at is None:
            status.first_step_at = status.progress_at
        self._dirty = True

    @contextlib.contextmanager
    def phase(self, name: str):
        """A save, an evaluation, a rollback: a longer allowance while it lasts (nested: the outer
        one counts)."""
        if self._phase is not None:
            yield
            return
        self._phase, self._phase_started = name, time.monotonic()
        self.status.phase = name
        self._dirty = True
        try:
            yield
        finally:
            now = time.monotonic()
            self._longest[name] = max(self._longest.get(name, 0.0), now - self._phase_started)
            self._phase = None
            self.status.phase = "train"
            self._last = now
            self._dirty = True

    def disarm(self) -> None:
        self._armed = False

    def finish(self, state: str, *, exit_code: int, detail: str = "") -> None:
        """The rank's fate, written at once (the thread may not get another turn)."""
        self._armed = False
        self._stop.set()
        self.status.state, self.status.exit_code, self.status.detail = state, exit_code, detail
        if self._root is not None:
            health.write_status(self._root, self.status)

    def stop(self) -> None:
        self._armed = False
        self._stop.set()

    # -- the allowance -----------------------------------------------------------------------------
    def base_s(self) -> float:
        if self.limits.fixed_s is not None:
            return self.limits.fixed_s
        median = statistics.median(self._step_times) if len(self._step_times) >= 5 else 0.0
        return max(AUTO_MEDIAN_FACTOR * median, AUTO_FLOOR_S)

    def allowance_s(self) -> float:
        if not self._stepped:
            allowance = self.limits.first_step_s
        elif self._phase is not None:
            base = self.base_s()
            allowance = base + max(base, PHASE_FACTOR * self._longest.get(self._phase, 0.0))
        else:
            allowance = self.base_s()
        return min(allowance, self.limits.collective_s - COLLECTIVE_MARGIN_S / 2)

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            allowance = self.allowance_s()
            idle = time.monotonic() - self._last
            if self._armed and idle > allowance:
                self._fire(idle, allowance)
                return
            self.status.deadline_s = allowance if self._armed else None
            if self._root is not None and (
                    self._dirty or time.monotonic() - self._written > HEARTBEAT_S):
                self._dirty = False
                self._written = time.monotonic()
                health.write_status(self._root, self.status)

    def _fire(self, idle: float, allowance: float) -> None:
        where = f"during {self._phase}" if self._phase else \
            ("before the first step" if not self._stepped else f"after step {self.status.step}")
        line = (f"hang: rank {self.rank} (pid {os.getpid()}) completed no optimizer step for "
                f"{idle:.0f} s {where} (allowance {allowance:.0f} s); the stacks of its threads "
                f"follow; exiting with code {health.HANG_EXIT_CODE}")
        stacks = dump_stacks()
        try:
            log.error("%s\n%s", line, stacks)
            for handler in log.handlers:
                handler.flush()
        except Exception:  # noqa: BLE001 - the exit below must happen whatever logging does
            pass
        if self._root is not None:
            path = health.status_path(self._root, self.status.attempt,
                                      self.rank).with_suffix(".stacks.txt")
            with contextlib.suppress(OSError):
                path.write_text(line + "\n" + stacks)
            line += f" (stacks also in {path})"
        self.finish(health.HUNG, exit_code=health.HANG_EXIT_CODE, detail=line)
        sys.stderr.flush()
        os._exit(health.HANG_EXIT_CODE)


def dump_stacks() -> str:
    """Every thread's Python stack, as faulthandler writes it (it needs a real file)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()
