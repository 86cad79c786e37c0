"""The trackers a run reports to (report_to without tensorboard, which metrics.py writes itself):
one TrackerThread each, the same points to all, and one summary at the end."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Callable

from neox_train.config import RunConfig
from neox_train.errors import MissingExtra
from neox_train.log import log
from neox_train.track.sender import Ledger, Point, Sink, TrackerThread
from neox_train.track.sinks import MlflowSink, Target, WandbSink

# What each tracker needs installed, and the extra that installs it.
PACKAGES = {"wandb": ("wandb", "neox-train[wandb]"), "mlflow": ("mlflow", "neox-train[mlflow]")}
# At the end of a run, how long the trackers may take to send what is queued and end their runs.
CLOSE_S = 20.0


def check_installed(names: tuple[str, ...], *, what: str = "report_to") -> None:
    """One line naming the extra when a tracker's package is missing (before anything starts)."""
    for name in names:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            module, extra = PACKAGES[name]
            raise MissingExtra(f"{what} names {name}, but the {module} package is not installed: "
                              f"pip install '{extra}' (or drop {name} from {what})")


def run_target(run: RunConfig, run_id: str, *, log_dir: str | None = None) -> Target:
    """The tracker runs of a neox-train run: keyed by its run id, shown as CONFIG-RUNID, in the
    project tracker_project, files (W&B's, the default MLflow store) in its log dir."""
    return Target(run_id=run_id, name=f"{run.name}-{run_id}", project=run.tracker_project,
                  log_dir=Path(log_dir or run.log_dir))


def starter(name: str, target: Target, config: dict[str, Any], *,
            eval_run: bool = False) -> Callable[[], Sink]:
    if name == "wandb":
        return lambda: WandbSink(target, config, eval_run=eval_run)
    if name == "mlflow":
        return lambda: MlflowSink(target, config, eval_run=eval_run)
    raise ValueError(f"no tracker named {name!r}")


class Trackers:
    """The run's trackers other than TensorBoard; `log` never blocks."""

    def __init__(self, names: tuple[str, ...], target: Target, config: dict[str, Any], *,
                 eval_run: bool = False):
        ledgers = Path(target.log_dir) / "trackers"
        self.threads = [
            TrackerThread(n, starter(n, target, config, eval_run=eval_run),
                          None if eval_run else Ledger(ledgers / f"{n}.json", target.run_id))
            for n in names if n != "tensorboard"]

    def __bool__(self) -> bool:
        return bool(self.threads)

    def log(self, step: int, values: dict[str, float], *, at: float | None = None,
            catch_up: bool = False) -> None:
        """Queue `values` at `step` for every tracker (catch_up: see sender.Point)."""
        point = Point(step, time.time() if at is None else at, values, catch_up)
        for thread in self.threads:
            thread.put(point)

    def renewed(self) -> "Trackers":
        """neox-eval keeps one Trackers per run for hours: a tracker that could not start (a
        server down, the run not created yet) is started again for the next points."""
        for i, thread in enumerate(self.threads):
            if thread.dead:
                self.threads[i] = TrackerThread(thread.name, thread.start, thread.ledger)
        return self

    def close(self, *, failed: bool = False, timeout_s: float = CLOSE_S) -> dict[str, dict]:
        """Send what is queued, end the tracker runs; per tracker: sent, dropped, skipped."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.finish(failed=failed)
        out = {t.name: t.join(max(0.0, deadline - time.monotonic())) for t in self.threads}
        for name, counts in out.items():
            if counts["dropped"]:
                log.warning("tracker %s: %d point(s) dropped, %d sent", name, counts["dropped"],
                            counts["sent"])
        self.threads = []
        return out
