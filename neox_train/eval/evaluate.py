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

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from neox_train.checkpoint.local.tags import step_of_tag
from neox_train.config import RunConfig, from_dict
from neox_train.config_rules import tracker_names
from neox_train.convert.locate import locate
from neox_train.convert.to_hf import convert_located, options
from neox_train.errors import ConfigError, MissingExtra, one_line
from neox_train.eval import harness
from neox_train.eval.results import Location
from neox_train.track.trackers import Trackers, check_installed, run_target

# A checkpoint whose evaluation failed this many times is left alone by this watch (a restart tries
# again).
MAX_FAILURES = 3


@dataclass
class EvalSettings:
    tasks: list[str]
    include_path: str | None = None
    device: str = "cpu"
    batch_size: str = "8"
    limit: int | None = None
    dtype: str | None = None  # the export's dtype; None: the run's training precision
    tokenizer: str | None = None  # tokenizer.json for runs that recorded none
    credentials: str | None = None
    keep_hf: Path | None = None  # where converted folders are kept (one per tag)
    report_to: str | None = None  # None: the run's own report_to
    log_dir: str | None = None  # None: the run's own log_dir
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))


def say(message: str) -> None:
    print(f"neox-eval: {message}", file=sys.stderr, flush=True)


class Evaluator:
    """Evaluates checkpoints of one location; logs to the trackers of the run they belong to."""

    def __init__(self, location: Location, settings: EvalSettings, manager):
        self.location = location
        self.settings = settings
        self.manager = manager
        self._trackers: dict[str, Trackers] = {}  # per run id
        self._tensorboard: dict[str, Any] = {}  # per run id: a SummaryWriter

    def evaluate(self, tag: str) -> dict[str, dict] | None:
        """Evaluate `tag` on the tasks it has no result for; the records this process stored (None:
        nothing was missing)."""
        todo = self.location.missing(tag, self.settings.tasks)
        if not todo:
            return None
        run = self.location.run_json(tag)
        names, config = self._tracking(run)  # a missing tracker package fails before the work
        started = time.perf_counter()
        s = self.settings
        located = locate(self.location.source, tag, credentials=s.credentials,
                         scratch_parent=s.scratch)
        hf_dir = (s.keep_hf / tag if s.keep_hf else
                  Path(tempfile.mkdtemp(prefix=".neox-eval-", dir=s.scratch)) / "hf")
        try:
            exported = convert_located(options(self.location.source, hf_dir, tag=tag,
                                               dtype=s.dtype, tokenizer=s.tokenizer,
                                               overwrite=True), located)
            if not exported["tokenizer"]:
                raise ConfigError(f"{tag}: the run recorded no tokenizer, which lm-eval needs: "
                                  "pass --tokenizer FILE (the tokenizer.json it was trained with)")
            say(f"{tag}: evaluating {', '.join(todo)} on {s.device}")
            output = harness.run(hf_dir, todo, self.manager, device=s.device,
                                 batch_size=s.batch_size, limit=s.limit)
        finally:
            located.cleanup()
            if s.keep_hf is None:
                shutil.rmtree(hf_dir.parent, ignore_errors=True)
        step = run.get("step", step_of_tag(tag))
        seconds = round(time.perf_counter() - started, 3)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        stored = {}
        for task, record in harness.per_task(output, todo).items():
            record.update(tag=tag, step=step, run_id=run.get("run_id"), source=self.location.source,
                          model_args=harness.model_args(hf_dir), batch_size=s.batch_size,
                          limit=s.limit, evaluated_at=stamp, seconds=seconds)
            if self.location.write(tag, task, record):
                stored[task] = record
            else:  # logged by the process that stored it, not twice
                say(f"{tag}: {task} was stored by another process meanwhile; kept theirs")
        self._log(run.get("run_id"), names, config, step, stored)
        say(f"{tag}: done in {seconds:.1f} s: " + "; ".join(
            f"{k.removeprefix('downstream/')}={v:.4g}" for r in stored.values()
            for k, v in harness.scalars(r).items() if not k.endswith("_stderr")))
        return stored

    # -- the run's trackers ------------------------------------------------------------------------
    def _tracking(self, run: dict[str, Any]):
        """The trackers to log this run's results to, and its run config (checked: a tracker whose
        package is missing is one line before anything is evaluated)."""
        # a run config of another version: the fields this one knows
        known = {f.name for f in fields(RunConfig)}
        config = from_dict({k: v for k, v in (run.get("run_config") or {}).items() if k in known},
                           source="the checkpoint's run config")
        names = tracker_names(self.settings.report_to) if self.settings.report_to else \
            config.trackers()
        check_installed(names, what="--report-to" if self.settings.report_to else
                        "the run's report_to")
        return names, config

    def _log(self, run_id: str | None, names: tuple[str, ...], config, step: int,
             records: dict[str, dict]) -> None:
        values = {k: v for r in records.values() for k, v in harness.scalars(r).items()}
        if not run_id or not names or not values:
            return
        target = run_target(config, run_id, log_dir=self.settings.log_dir)
        if "tensorboard" in names:
            self._board(run_id, target.log_dir, step, values)
        if run_id not in self._trackers:
            self._trackers[run_id] = Trackers(names, target, {"run_id": run_id}, eval_run=True)
        self._trackers[run_id].renewed().log(step, values)

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
          stopping: Callable[[], bool]) -> tuple[list[str], dict[str, str]]:
    """Evaluate every complete checkpoint without all results, oldest first, then (unless `once`)
    wait for new ones until the run's final checkpoint (its max_steps) is done or `stopping()`.

    A checkpoint that fails (a download, the conversion, lm-eval itself) is one line and is tried
    again at the next look, up to MAX_FAILURES times; the others go on. Returns the tags evaluated
    and the last error of each tag that failed."""
    done: list[str] = []
    failures: dict[str, int] = {}
    errors: dict[str, str] = {}
    waiting_said = False
    while not stopping():
        tags = evaluator.location.complete_tags()
        for tag in tags:
            if stopping():
                return done, errors
            if failures.get(tag, 0) >= MAX_FAILURES:
                continue
            try:
                if evaluator.evaluate(tag) is not None:
                    done.append(tag)
                    waiting_said = False
                errors.pop(tag, None)
            except MissingExtra:
                raise  # the same for every checkpoint: the install lacks a tracker's package
            except Exception as e:  # noqa: BLE001 - one checkpoint's failure, whatever it is
                failures[tag] = failures.get(tag, 0) + 1
                errors[tag] = one_line(e)
                left = MAX_FAILURES - failures[tag]
                say(f"{tag}: failed ({errors[tag]}); "
                    + (f"trying again at the next look ({left} more)" if left and not once
                       else "left alone by this watch"))
        final = bool(tags) and _is_final(evaluator.location, tags[-1])
        retrying = bool(tags) and 0 < failures.get(tags[-1], 0) < MAX_FAILURES
        if once or (final and not retrying):
            if final and not once:
                say(f"{tags[-1]} is the run's final checkpoint (its max_steps): stopping")
            return done, errors
        if not waiting_said:
            say(f"waiting for new complete checkpoints at {evaluator.location.source} (every "
                f"{interval_s:g} s; Ctrl-C stops)")
            waiting_said = True
        deadline = time.monotonic() + interval_s
        while time.monotonic() < deadline and not stopping():
            time.sleep(min(1.0, interval_s))
    return done, errors


def _is_final(location: Location, tag: str) -> bool:
    """The tag at its run's max_steps (read from the tag's run.json)."""
    max_steps = (location.run_json(tag).get("run_config") or {}).get("max_steps")
    return isinstance(max_steps, int) and step_of_tag(tag) == max_steps
