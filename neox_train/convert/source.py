"""What a DeepSpeed checkpoint tag is, for `neox-convert-hf`: ZeRO stage, rank count, precision,
model config.

Everything here is read from file names and the small JSON/pickled headers before any weight is
read, so bad input fails in a second with one line (where the tag is: convert.locate; its weights:
convert.weights).
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from neox_train.checkpoint.local.tags import CONFIG_JSON, RUN_JSON, read_tag_json, step_of_tag
from neox_train.ds_config import precision
from neox_train.errors import ConvertError, one_line

MODEL_STATES_Z012 = "mp_rank_00_model_states.pt"
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """zero_to_fp32 reports progress with print(); stdout is reserved for `--json`."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- where the checkpoint is -----------------------------------------------------------------------


# -- what the checkpoint is ------------------------------------------------------------------------


def torch_load(path: Path) -> dict[str, Any]:
    """torch.load memory-mapped: nothing is read until a tensor is touched, so the optimizer moments
    cost nothing.

    weights_only=False because DeepSpeed pickles its own objects (enums, configs) into these files,
    as zero_to_fp32 itself loads them: convert only checkpoints you trust, as with any pickle."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing: the checkpoint is incomplete") from None
    # torch reports truncation/corruption as RuntimeError, pickle errors, EOFError, ...
    except Exception as err:
        raise ConvertError(
            f"{path} cannot be read, it is truncated or corrupt ({one_line(err)})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a {type(obj).__name__}, not a DeepSpeed state dict")
    return obj


@dataclass
class CheckpointInfo:
    tag_dir: Path
    tag: str
    stage: int
    dp_size: int
    precision: str  # what the run trained in: bf16, fp16 or fp32
    model_config: dict[str, Any]
    # run.json (or the same keys from the client state): step, consumed_samples, run_config, ...
    run: dict[str, Any]
    model_states: Path  # the file holding the module (rank 0's for ZeRO-3)
    # where model_config was read: config.json, or the client state's copy
    config_source: str = CONFIG_JSON

    @property
    def step(self) -> int | None:
        step = self.run.get("step")
        if step is None:
            step = step_of_tag(self.tag)
        return step


def _rank_files(tag_dir: Path, kind: str) -> dict[int, Path]:
    out = {}
    for p in tag_dir.glob(f"*_{kind}_states.pt"):
        m = _RANK_RE.search(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def inspect_checkpoint(tag_dir: Path) -> CheckpointInfo:
    """Stage, world size, precision and model config, from file names and the model-states header
    (mmap: cheap).

    Every rank's file must be present before anything is converted: a checkpoint that one rank never
    finished writing would otherwise fail deep inside zero_to_fp32, or not at all."""
    z3_model = _rank_files(tag_dir, "model")
    optim = _rank_files(tag_dir, "optim")
    if (tag_dir / MODEL_STATES_Z012).is_file():
        states_path = tag_dir / MODEL_STATES_Z012
    elif 0 in z3_model:
        states_path = z3_model[0]
    else:
        found = ", ".join(sorted(p.name for p in tag_dir.iterdir())[:8]) or "nothing"
        raise ConvertError(
            f"{tag_dir} is not a DeepSpeed checkpoint: no {MODEL_STATES_Z012} nor "
            f"zero_pp_rank_0_mp_rank_00_model_states.pt (found: {found})"
        )
    states = torch_load(states_path)
    if "module" not in states:
        raise ConvertError(
            f"{states_path} has no 'module' entry: not a DeepSpeed model-states file")

    ds_config = states.get("ds_config") if isinstance(states.get("ds_config"), dict) else {}
    run = read_tag_json(tag_dir, RUN_JSON, error=ConvertError) or {
        k: states[k] for k in ("step", "consumed_samples", "dp_size", "data_tokens", "run_config",
                               "ds_config")
        if k in states}
    if not ds_config:
        ds_config = run.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    dp_size = int(states.get("dp_world_size") or run.get("dp_size") or 1)

    if stage == 3:
        missing = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(dp_size)
                   for kind, have in (("model", z3_model), ("optim", optim)) if r not in have]
    elif stage in (1, 2):
        missing = [f"(bf16_)zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(dp_size)
                   if r not in optim]
    else:
        missing = []
    if missing:
        raise ConvertError(
            f"{tag_dir} is a ZeRO-{stage} checkpoint of {dp_size} ranks but lacks "
            f"{', '.join(missing)}: a rank never finished writing it (convert another tag)"
        )

    model_config, config_source = _read_model_config(tag_dir, states, states_path)
    return CheckpointInfo(tag_dir=tag_dir, tag=tag_dir.name, stage=stage, dp_size=dp_size,
                          precision=precision(ds_config), model_config=model_config, run=run,
                          model_states=states_path, config_source=config_source)


def _read_model_config(tag_dir: Path, states: dict[str, Any],
                       states_path: Path) -> tuple[dict[str, Any], str]:
    """The HF config the run trained, and where it was read: TAG/config.json (written by
    neox-train), else the client state's copy."""
    cfg, where = read_tag_json(tag_dir, CONFIG_JSON, error=ConvertError), CONFIG_JSON
    if cfg is None:
        cfg, where = states.get("model_config"), f"{states_path.name}'s client state"
        if not isinstance(cfg, dict):
            raise ConvertError(
                f"{tag_dir} holds no model config (no config.json, and no 'model_config' in "
                f"{states_path.name}'s client state): it was not written by neox-train, so the "
                "architecture is unknown"
            )
    if cfg.get("model_type") != "gpt_neox":
        raise ConvertError(f"{tag_dir}: model config has model_type={cfg.get('model_type')!r}; "
                           f"only 'gpt_neox' converts")
    return cfg, where


# -- the weights -----------------------------------------------------------------------------------


