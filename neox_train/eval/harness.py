"""lm-evaluation-harness, as neox-eval runs it: the task names checked before any checkpoint is
touched, one `simple_evaluate` over a converted HF folder, and its results cut into one record per
requested task (a group keeps its subtasks).

The model arguments are recorded with each result, so `lm_eval --model hf --model_args ARGS
--tasks TASK` on the same folder reproduces it (tests/test_eval.py checks that it does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from neox_train.errors import ConfigError, MissingExtra

# The Pythia paper's zero-shot set (Biderman et al. 2023, Table 4 and appendix).
DEFAULT_TASKS = ("lambada_openai", "piqa", "winogrande", "arc_easy", "arc_challenge", "sciq",
                 "logiqa")
EXTRA = "neox-train[eval]"


def _lm_eval():
    try:
        import lm_eval  # deferred: an optional extra (neox-train[eval]), and 0.8 s to import
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingExtra(
            f"neox-eval needs lm-evaluation-harness: pip install '{EXTRA}'") from None
    return lm_eval, TaskManager


def task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager that knows every name in `tasks`, or ConfigError naming the unknown ones
    (before any checkpoint is touched).

    lm_eval's own index of ~15k task files takes seconds to build: when --include-path holds every
    task asked for, it is not built."""
    _, TaskManager = _lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a folder (expected a folder of "
                          "lm-eval task YAMLs)")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (valid: a task, group or tag name of "
            f"lm-evaluation-harness {_version()} such as {', '.join(DEFAULT_TASKS[:3])}, or one "
            "defined by a YAML in --include-path; `lm_eval ls tasks` lists them)")
    return manager


def expand_tags(tasks: list[str], manager) -> list[str]:
    """A tag (ai2_arc) names its member tasks; lm_eval reports their results only, not the tag's,
    so each member is a task of its own here (its own result file and tracker points). Tasks and
    groups stay as named (a group's result holds its subtasks')."""
    out: list[str] = []
    for name in tasks:
        if name in manager.all_tags:
            out += sorted(n for n, entry in manager.task_index.items() if name in entry.tags)
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def _version() -> str:
    from importlib.metadata import version  # deferred: only for an error message

    return version("lm_eval")


def model_args(hf_dir: Path) -> str:
    """lm_eval's --model_args for the exported folder: its own dtype (the export's)."""
    return f"pretrained={hf_dir},dtype=auto"


def run(hf_dir: Path, tasks: list[str], manager, *, device: str, batch_size: str,
        limit: int | None) -> dict[str, Any]:
    """One simple_evaluate over `tasks`; lm_eval's result dict (samples not kept)."""
    lm_eval, _ = _lm_eval()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm_eval builds an accelerate Accelerator per run; an evaluation that failed part-way leaves
    # accelerate's process-wide state half made, and every later one in this process (the watch's
    # retries) then fails on it ("AcceleratorState has no attribute num_processes", seen in CI).
    from accelerate.state import AcceleratorState  # deferred with lm_eval

    AcceleratorState._reset_state(reset_partial_state=True)
    # lm_eval print()s its bootstrap notes: stdout is for --json only.
    with contextlib.redirect_stdout(sys.stderr):
        return lm_eval.simple_evaluate(
            model="hf", model_args=model_args(hf_dir), tasks=list(tasks), task_manager=manager,
            device=device, batch_size=batch_size, limit=limit, log_samples=False)


def per_task(output: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """lm_eval's output as one JSON-safe record per requested task: its results (and those of its
    subtasks, for a group), versions, n-shot, sample counts and lm_eval's configuration."""
    out = {}
    groups = output.get("group_subtasks") or {}
    for task in tasks:
        names = [task, *groups.get(task, [])]
        if not any(n in output["results"] for n in names):
            raise RuntimeError(f"lm_eval returned no result for {task} (results for: "
                               f"{', '.join(output['results']) or 'nothing'})")
        pick = {k: {n: v[n] for n in names if n in v}
                for k, v in output.items() if k in ("versions", "n-shot", "n-samples",
                                                    "higher_is_better")}
        out[task] = _json_safe({
            "task": task,
            "results": {n: output["results"][n] for n in names if n in output["results"]},
            **pick,
            "lm_eval_version": output.get("lm_eval_version"),
            "config": output.get("config"),
        })
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A task record's metrics as tracker points: downstream/TASK/METRIC (lm_eval's "acc,none"
    becomes acc; another filter keeps its name: acc_strict-match)."""
    out = {}
    for name, metrics in record["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not filt:
                continue
            if math.isfinite(value):
                label = metric if filt == "none" else f"{metric}_{filt}"
                out[f"downstream/{name}/{label}"] = float(value)
    return out


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
