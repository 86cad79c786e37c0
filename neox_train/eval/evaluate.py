"""One checkpoint through lm-evaluation-harness, and `--watch`: every complete checkpoint of a run
as it appears.

A checkpoint: located (a gs:// tag is fetched and checked against its manifest, a local one
against its completeness marker), converted to a HuggingFace folder by convert/ (any ZeRO stage,
any world size), evaluated on the tasks it has no result for, stored under eval/ and logged to
the run's trackers at its step. The converted folder is scratch unless --keep-hf names a place.

Training never waits for any of it: it reads what the run published, from another process or
machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from neox_train.checkpoint.local.tags import RUN_JSON, read_tag_json, step_of_tag
from neox_train.config_rules import tracker_names
from neox_train.convert.locate import locate
from neox_train.convert.to_hf import convert_located, options
from neox_train.errors import ConvertError
from neox_train.eval import harness
from neox_train.eval.results import Location
from neox_train.track.sinks import Target
from neox_train.track.trackers import Trackers, check_installed


@dataclass
class EvalSettings:
    tasks: list[str]
    include_path: str | None = None
    device: str = "cpu"
    batch_size: str = "8"
    limit: int | None = None
    dtype: str | None = None  # the export's dtype; None: the run's training precision
    credentials: str | None = None
    keep_hf: Path | None = None  # where converted folders are kept (one per tag)
    report_to: str | None = None  # None: the run's own report_to
    log_dir: str | None = None  # None: the run's own log_dir
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))


def say(message: str) -> None:
    print(f"neox-eval: {message}", file=sys.stderr, flush=True)


class Evaluator:
    """Evaluates checkpoints of one location; logs to the trackers of the run they belong to."""

    def __init__(self, location: Location, settings: EvalSettings):
        self.location = location
        self.settings = settings
        self.manager = harness.task_manager(settings.tasks, settings.include_path)
        self._trackers: dict[str, Trackers] = {}  # per run id
        self._tensorboard: dict[str, Any] = {}  # per run id: a SummaryWriter

    def evaluate(self, tag: str) -> dict[str, dict] | None:
        """Evaluate `tag` on the tasks it has no result for; their records (None: nothing was
        missing)."""
        todo = self.location.missing(tag, self.settings.tasks)
        if not todo:
            return None
        started = time.perf_counter()
        s = self.settings
        located = locate(self.location.source, tag, credentials=s.credentials,
                         scratch_parent=s.scratch)
        hf_dir = (s.keep_hf / tag if s.keep_hf else
                  Path(tempfile.mkdtemp(prefix=".neox-eval-", dir=s.scratch)) / "hf")
        try:
            run = read_tag_json(located.tag_dir, RUN_JSON, error=ConvertError) or {}
            convert_located(options(self.location.source, hf_dir, tag=tag, dtype=s.dtype,
                                    overwrite=True), located)
            say(f"{tag}: evaluating {', '.join(todo)} on {s.device}")
            output = harness.run(hf_dir, todo, self.manager, device=s.device,
                                 batch_size=s.batch_size, limit=s.limit)
        finally:
            located.cleanup()
            if s.keep_hf is None:
                shutil.rmtree(hf_dir.parent, ignore_errors=True)
        step = run.get("step", step_of_tag(tag))
        records = harness.per_task(output, todo)
        seconds = round(time.perf_counter() - started, 3)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for task, record in records.items():
            record.update(tag=tag, step=step, run_id=run.get("run_id"), source=self.location.source,
                          model_args=harness.model_args(hf_dir), batch_size=s.batch_size,
                          limit=s.limit, evaluated_at=stamp, seconds=seconds)
            if not self.location.write(tag, task, record):
                say(f"{tag}: {task} was stored by another process meanwhile; kept theirs")
        self._log(run, step, records)
        say(f"{tag}: done in {seconds:.1f} s: " + "; ".join(
            f"{k.removeprefix('downstream/')}={v:.4g}" for r in records.values()
            for k, v in harness.scalars(r).items() if "stderr" not in k))
        return records

    # -- the run's trackers ------------------------------------------------------------------------
    def _log(self, run: dict[str, Any], step: int, records: dict[str, dict]) -> None:
        run_id = run.get("run_id")
        config = run.get("run_config") or {}
        names = tracker_names(self.settings.report_to or config.get("report_to", "tensorboard"))
        if not run_id or not names:
            return
        values = {k: v for r in records.values() for k, v in harness.scalars(r).items()}
        log_dir = Path(self.settings.log_dir or config.get("log_dir", "logs"))
        if "tensorboard" in names:
            self._board(run_id, log_dir, step, values)
        if run_id not in self._trackers:
            check_installed(names, what="the run's report_to")
            target = Target(run_id=run_id, name=f"{config.get('name', 'run')}-{run_id}",
                            project=config.get("tracker_project", "neox-train"), log_dir=log_dir)
            self._trackers[run_id] = Trackers(names, target, {"run_id": run_id}, eval_run=True)
        self._trackers[run_id].log(step, values)

    def _board(self, run_id: str, log_dir: Path, step: int, values: dict[str, float]) -> None:
        if run_id not in self._tensorboard:
            # deferred: TensorBoard's writer (torch.utils.tensorboard) only when the run uses it
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard[run_id] = SummaryWriter(str(log_dir / "tensorboard" / "downstream"))
        for name, value in values.items():
            self._tensorboard[run_id].add_scalar(name, value, step)
        self._tensorboard[run_id].flush()

    def close(self) -> dict[str, dict]:
        for writer in self._tensorboard.values():
            writer.close()
        counts: dict[str, dict] = {}
        for trackers in self._trackers.values():
            counts.update(trackers.close())
        return counts


def watch(evaluator: Evaluator, *, once: bool, interval_s: float,
          stopping: Callable[[], bool]) -> list[str]:
    """Evaluate every complete checkpoint without all results, oldest first, then (unless `once`)
    wait for new ones until the run's final checkpoint (its max_steps) is done or `stopping()`.
    Returns the tags evaluated."""
    done: list[str] = []
    waiting_said = False
    while not stopping():
        tags = evaluator.location.complete_tags()
        for tag in tags:
            if stopping():
                return done
            if evaluator.evaluate(tag) is not None:
                done.append(tag)
                waiting_said = False
        if once or (tags and _is_final(evaluator, tags[-1])):
            if not once:
                say(f"{tags[-1]} is the run's final checkpoint (its max_steps): stopping")
            return done
        if not waiting_said:
            say(f"waiting for new complete checkpoints at {evaluator.location.source} (every "
                f"{interval_s:g} s; Ctrl-C stops)")
            waiting_said = True
        deadline = time.monotonic() + interval_s
        while time.monotonic() < deadline and not stopping():
            time.sleep(min(1.0, interval_s))
    return done


def _is_final(evaluator: Evaluator, tag: str) -> bool:
    """The tag at its run's max_steps (read from the tag's run.json)."""
    raw = evaluator.location.backend.read_bytes(f"{tag}/{RUN_JSON}")
    try:
        run = json.loads(raw) if raw else {}
    except ValueError:
        return False
    max_steps = (run.get("run_config") or {}).get("max_steps")
    return isinstance(max_steps, int) and step_of_tag(tag) == max_steps
