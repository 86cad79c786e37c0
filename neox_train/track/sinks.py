"""The tracker runs: a W&B run and an MLflow run per neox-train run, found again by the run id that
travels in the checkpoint (run.json and the completeness marker), so every start of the run (a
supervisor restart, a resume on another GPU count or machine) continues the same tracker run.

- W&B: the run's id IS the neox-train run id; `resume="allow"` continues it. WANDB_MODE,
  WANDB_ENTITY and the rest of W&B's variables apply as usual.
- MLflow: the run carries the tag `neox_run_id`; a start looks it up in the experiment
  (tracker_project) and creates it only when absent. MLFLOW_TRACKING_URI names the server; without
  it, a SQLite store in the log dir.

The packages are imported here only, on the tracker's thread (sender.py), so a run that does not
report to them never loads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neox_train.track.sender import Point

# MLflow's limits: params per log_batch, a param value's length, metrics per log_batch.
_MLFLOW_PARAMS, _MLFLOW_VALUE, _MLFLOW_METRICS = 100, 6000, 1000
RUN_ID_TAG = "neox_run_id"


@dataclass(frozen=True)
class Target:
    """Which tracker run: the neox-train run id (from the checkpoint), how it is shown, where."""

    run_id: str
    name: str
    project: str
    log_dir: Path


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested configs as MLflow params: dotted keys, JSON values (lists whole), cut to MLflow's
    length limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:_MLFLOW_VALUE]
    return out


class WandbSink:
    """A W&B run with id = the neox-train run id. `eval_run`: the sibling run neox-eval logs to
    (W&B takes a run's history from one process only, in step order; evaluations arrive later and
    out of order, so they go to `<run id>-eval` in the same group, plotted against
    checkpoint/step)."""

    def __init__(self, target: Target, config: dict[str, Any], *, eval_run: bool = False):
        import wandb  # deferred: an optional extra (neox-train[wandb]), loaded only when used

        run_id = f"{target.run_id}-eval" if eval_run else target.run_id
        # Offline, W&B cannot resume (each process writes a run file of its own with this id;
        # `wandb sync` joins them): asking for it only prints a warning.
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
        Path(target.log_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=target.project, id=run_id, group=target.run_id,
            resume=None if offline else "allow",
            name=f"{target.name}-eval" if eval_run else target.name,
            job_type="eval" if eval_run else "train", dir=str(target.log_dir),
            settings=wandb.Settings(console="off", silent=True), reinit="create_new")
        # A resume on another world size changes some values (data_parallel_size): allowed here,
        # where passing config= to init would refuse a changed key of a resumed run.
        self.run.config.update(config, allow_val_change=True)
        self.eval_run = eval_run
        self._step = -1
        if eval_run:
            self.run.define_metric("checkpoint/step")
            self.run.define_metric("*", step_metric="checkpoint/step")

    def last_step(self) -> int | None:
        # Online, a resumed run starts at the step after its newest row, a new one at 0; an offline
        # run knows nothing of the files of earlier processes.
        if self.run.offline:
            return None
        return self.run.step - 1 if self.run.resumed else -1

    def log(self, points: list[Point]) -> None:
        for p in points:
            if self.eval_run:
                self.run.log({**p.values, "checkpoint/step": p.step})
                continue
            # W&B's steps only go forward: a point reported late (an asynchronous save's
            # checkpoint/* at its own step) goes in the newest row; TensorBoard, MLflow and
            # metrics.jsonl keep its own step.
            self._step = max(self._step, p.step)
            self.run.log(p.values, step=self._step)

    def close(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowSink:
    """The MLflow run tagged with the neox-train run id, in the experiment `target.project`."""

    def __init__(self, target: Target, config: dict[str, Any], *, eval_run: bool = False):
        """`eval_run`: neox-eval's points go into the training run itself (MLflow takes any step
        from any process); it must exist, and its status and params are left alone."""
        from mlflow import MlflowClient  # deferred: an optional extra (neox-train[mlflow])

        # set_terminated prints the run's URL to stdout, which belongs to --json outputs
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

        uri = os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{Path(target.log_dir).resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        experiment = self._experiment(target.project)
        found = self.client.search_runs(
            [experiment], filter_string=f"tags.{RUN_ID_TAG} = '{target.run_id}'", max_results=1)
        self.eval_run = eval_run
        if eval_run:
            if not found:
                raise LookupError(f"no MLflow run tagged {RUN_ID_TAG}={target.run_id} in "
                                  f"experiment {target.project!r} at {uri}")
            self.run_id, self.resumed = found[0].info.run_id, False
            return
        if found:
            self.run_id, self.resumed = found[0].info.run_id, True
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(
                experiment, run_name=target.name, tags={RUN_ID_TAG: target.run_id}).info.run_id
            self.resumed = False
        self._params(flat(config), found[0].data.params if found else {})

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process created it in between
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _params(self, params: dict[str, str], held: dict[str, str]) -> None:
        """New params are logged; MLflow's params are immutable, so a value this start changed (a
        resume on another GPU count: plan.dp_size) becomes the tag `changed.KEY`."""
        from mlflow.entities import Param, RunTag  # deferred: the optional extra

        new = [Param(k, v) for k, v in params.items() if k not in held]
        changed = [RunTag(f"changed.{k}", v) for k, v in params.items()
                   if k in held and held[k] != v]
        for i in range(0, len(new), _MLFLOW_PARAMS):
            self.client.log_batch(self.run_id, params=new[i:i + _MLFLOW_PARAMS])
        for i in range(0, len(changed), _MLFLOW_PARAMS):
            self.client.log_batch(self.run_id, tags=changed[i:i + _MLFLOW_PARAMS])

    def last_step(self) -> int | None:
        if not self.resumed:
            return -1
        data = self.client.get_run(self.run_id).data
        # get_run returns each key's newest point, the one at its highest step (RunData keeps them
        # as Metric objects; its public dict has the values only). The full history is the
        # fallback, one request per key.
        latest = getattr(data, "_metric_objs", None)
        if latest is None:
            latest = [m for key in data.metrics
                      for m in self.client.get_metric_history(self.run_id, key)]
        return max((m.step for m in latest), default=-1)

    def log(self, points: list[Point]) -> None:
        from mlflow.entities import Metric  # deferred: the optional extra

        metrics = [Metric(key, value, int(p.time * 1000), p.step)
                   for p in points for key, value in p.values.items()]
        for i in range(0, len(metrics), _MLFLOW_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _MLFLOW_METRICS])

    def close(self, *, failed: bool) -> None:
        if not self.eval_run:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
