"""The run config's rules for values that need nothing of RunConfig itself: numbers and spans, the
model preset and its sequence length, the data mixture. config.validate runs them, and the rules
that follow from the fields (types, choices)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from neox_train.model import MODEL_PRESETS


def profile_span(text: str | None) -> tuple[int, int] | None:
    """profile_steps "A-B" as (A, B); None when absent or not a valid span."""
    first, dash, last = (text or "").partition("-")
    if not (dash and first.isdigit() and last.isdigit()):
        return None
    a, b = int(first), int(last)
    return (a, b) if 1 <= a <= b else None


# Where a run's metrics can go (--report-to); "none" alone turns all of them off.
TRACKERS = ("tensorboard", "wandb", "mlflow")


def tracker_names(text: Any) -> tuple[str, ...] | None:
    """report_to "tensorboard,wandb" as ("tensorboard", "wandb"); "none" as (); None when it names
    something else."""
    if not isinstance(text, str):
        return None
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    return names if names and all(n in TRACKERS for n in names) else None


def tracker_problems(values: dict[str, Any]) -> list[str]:
    out = []
    text = values.get("report_to")
    if tracker_names(text) is None:
        out.append(f"report_to={text!r} is not valid (valid: a comma-separated list of "
                   f"{', '.join(TRACKERS)}, or none)")
    project = values.get("tracker_project")
    if not isinstance(project, str) or not project.strip():
        out.append(f"tracker_project={project!r} must be a non-empty string (the W&B project and "
                   "MLflow experiment)")
    return out


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def model_problems(values: dict[str, Any]) -> list[str]:
    model, seq = values.get("model"), values.get("seq_len")
    if model not in MODEL_PRESETS:
        return [f"model={model!r} is not a preset (valid: {', '.join(MODEL_PRESETS)})"]
    max_seq = MODEL_PRESETS[model].max_seq_len
    return ([f"seq_len={seq} exceeds {model}'s max_seq_len {max_seq}"]
            if is_int(seq) and seq > max_seq else [])


def number_problems(values: dict[str, Any]) -> list[str]:
    out = []
    peak, vf, ut = (values.get("peak_tflops"), values.get("val_fraction"),
                    values.get("upload_timeout_s"))
    if peak is not None and not (is_number(peak) and peak > 0):
        out.append(f"peak_tflops={peak!r} must be a number of TFLOP/s > 0 or null")
    if not (is_number(vf) and 0.0 <= vf <= 0.5):
        out.append(f"val_fraction={vf!r} is out of range: must be a number in [0, 0.5]")
    if not (is_number(ut) and ut >= 0):
        out.append(f"upload_timeout_s={ut!r} must be a number of seconds >= 0")
    hang = values.get("hang_timeout_s")
    if hang is not None and not (is_number(hang) and hang > 0):
        out.append(f"hang_timeout_s={hang!r} must be a number of seconds > 0 or null (automatic)")
    factor = values.get("loss_spike_factor")
    if not (is_number(factor) and (factor == 0 or factor > 1)):
        out.append(f"loss_spike_factor={factor!r} must be a number > 1, or 0 (no spike check)")
    grace = values.get("preemption_grace_s")
    if not (is_number(grace) and grace > 0):
        out.append(
            f"preemption_grace_s={grace!r} must be a number of seconds > 0 (GCE Spot gives 30)")
    decay, steps = values.get("decay_steps"), values.get("max_steps")
    if is_int(decay) and is_int(steps) and decay > steps:
        out.append(f"decay_steps={decay} is more than max_steps={steps} (the decay is the last "
                   "decay_steps of the run)")
    quiet = values.get("unreachable_warning_s")
    if not (is_number(quiet) and quiet > 0):
        out.append(f"unreachable_warning_s={quiet!r} must be a number of seconds > 0 (default 30)")
    return out


def mixture_problems(values: dict[str, Any]) -> list[str]:
    data = values.get("data")
    if data is None:
        return []
    valid = 'a non-empty list of {"path": "...", "weight": number > 0, "name": optional string}'
    if not isinstance(data, list) or not data:
        return [f"data={data!r} must be {valid}, or null (use data_dir)"]
    out, names = [], []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            out.append(f"data[{i}]={entry!r} must be an object ({valid})")
            continue
        unknown = sorted(set(entry) - {"path", "weight", "name"})
        path, weight = entry.get("path"), entry.get("weight")
        if unknown:
            out.append(
                f"data[{i}] has unknown key(s) {', '.join(unknown)} (valid: path, weight, name)")
        if not isinstance(path, str) or not path:
            out.append(f"data[{i}].path={path!r} must be a non-empty string")
        if not (is_number(weight) and weight > 0 and math.isfinite(weight)):
            out.append(f"data[{i}].weight={weight!r} must be a number > 0 (the share of samples "
                       "drawn from it)")
        name = entry.get("name", Path(path).name if isinstance(path, str) else None)
        if not isinstance(name, str) or not name:
            out.append(f"data[{i}].name={name!r} must be a non-empty string")
        names.append(name)
    duplicates = sorted({n for n in names if names.count(n) > 1 and isinstance(n, str)})
    if duplicates:
        out.append(f"data: the names {', '.join(duplicates)} appear twice; give each dataset its "
                   "own \"name\"")
    return out
