"""Where numbers go: logs/training.log, metrics.jsonl (one record per log/eval step), TensorBoard
events and the trackers of report_to (W&B, MLflow: neox_train.track), all under the same names.

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

from neox_train.track.trackers import CLOSE_S, Trackers, run_target
from neox_train.train.perf import StepTimer, breakdown
from neox_train.train.plan import RunPlan


class Metrics:
    """A JSON-lines record per call, TensorBoard scalars and the trackers' points; a no-op on ranks
    other than 0."""

    def __init__(self, log_dir: Path, *, enabled: bool, start_step: int = 0,
                 tensorboard: bool = True, trackers: Trackers | None = None):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        self.trackers = trackers if enabled and trackers else None
        if enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                # purge_step: after a resume, TensorBoard drops the events a crashed run wrote past
                # the checkpoint, so the curve has no doubled steps.
                self._writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)
            self._jsonl = open(log_dir / "metrics.jsonl", "a", buffering=1)

    @classmethod
    def for_run(cls, plan: RunPlan, run_id: str, *, enabled: bool, start_step: int) -> "Metrics":
        """A run's metrics: its log dir, TensorBoard and the W&B / MLflow runs its report_to names,
        keyed by its run id, which the checkpoint carries (every start of the run continues them).
        Their config: what --describe prints (run config, effective DeepSpeed config, the plan) and
        the run id."""
        run = plan.run
        trackers = (Trackers(run.trackers(), run_target(run, run_id),
                             {**plan.describe(), "run_id": run_id}) if enabled else None)
        return cls(Path(run.log_dir), enabled=enabled, start_step=start_step,
                   tensorboard="tensorboard" in run.trackers(), trackers=trackers)

    def record(self, step: int, kind: str, values: dict[str, Any], *,
               catch_up: bool = False) -> None:
        """Write `values` as one metrics.jsonl line, and its finite numbers as TensorBoard scalars
        and tracker points `kind/name` (catch_up: a point about this start, see
        track.sender.Point)."""
        if not self.enabled:
            return
        now = time.time()
        scalars = {f"{kind}/{name}": float(value) for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value)}
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
        if self.trackers is not None and scalars:
            self.trackers.log(step, scalars, at=now, catch_up=catch_up)
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": now, **values}) + "\n")

    def close(self, *, failed: bool = False, timeout_s: float | None = None) -> dict[str, dict]:
        """Close the files; send what the trackers have queued (within trackers.CLOSE_S, or
        `timeout_s` when less) and end their runs. The trackers' counts (sent, dropped, skipped),
        for the run's summary."""
        if not self.enabled:
            return {}
        self.enabled = False
        if self._writer is not None:
            self._writer.close()
        self._jsonl.close()
        if self.trackers is None:
            return {}
        limit = CLOSE_S if timeout_s is None else min(CLOSE_S, timeout_s)
        return self.trackers.close(failed=failed, timeout_s=limit)


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
