"""Where numbers go: logs/training.log, metrics.jsonl (one record per log/eval step), TensorBoard
events.

Only rank 0 writes; other ranks get a Metrics whose methods do nothing, so the loop never branches
on rank.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from neox_train.train.perf import StepTimer, breakdown


class Metrics:
    """TensorBoard scalars + a JSON-lines record per call; a no-op on ranks other than 0."""

    def __init__(self, log_dir: Path, *, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step: after a resume, TensorBoard drops the events a crashed run wrote past the
            # checkpoint, so the curve has no doubled steps.
            self._writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step else None)
            self._jsonl = open(log_dir / "metrics.jsonl", "a", buffering=1)

    def record(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Write `values` as TensorBoard scalars `kind/name` and one metrics.jsonl line."""
        if not self.enabled:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{name}", value, step)
        self._jsonl.write(
            json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            self.enabled = False


class Throughput:
    """Tokens/s, seconds per step and where those seconds went, between two log points (wall clock,
    all ranks' tokens).

    The per-phase totals come from a `perf.StepTimer` the loop feeds; checkpoint stalls are reported
    apart from the step time (a save is not a training step) as the seconds lost to saves since the
    previous reading.
    """

    def __init__(self, tokens_per_step: int, timer: StepTimer | None = None):
        self.tokens_per_step = tokens_per_step
        self.timer = timer
        self._t0 = time.perf_counter()
        self._steps = 0
        self._stall_s = 0.0

    def step(self) -> None:
        self._steps += 1

    def add_checkpoint_stall(self, seconds: float) -> None:
        self._stall_s += seconds

    def read_and_reset(self) -> dict[str, float]:
        # The timer first: on CUDA it waits for the last recorded event, so the wall clock read next
        # covers the device work of these steps too.
        totals = self.timer.read_and_reset() if self.timer is not None else None
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        steps = max(self._steps, 1)
        out = {"tokens_per_s": self._steps * self.tokens_per_step / elapsed,
               "step_time_s": elapsed / steps}
        if totals is not None:
            out.update(breakdown(totals, steps=steps, step_time_s=out["step_time_s"]))
        out["checkpoint_stall_s"] = self._stall_s
        self._t0, self._steps, self._stall_s = now, 0, 0.0
        return out

    def restart(self) -> None:
        """Exclude time spent outside training steps (evaluation, checkpointing) from the next
        reading.

        Steps already counted are dropped with the time they took (and their phase times), so the
        next reading stays a true rate even when saves and evaluations fall between two log
        points."""
        if self.timer is not None:
            self.timer.reset()
        self._t0 = time.perf_counter()
        self._steps = 0
