"""Checkpoints: DeepSpeed's own save/load, plus what DeepSpeed does not carry (data position, configs, RNG)
and local keep-last-N retention.

Layout (DeepSpeed's): SAVE_DIR/latest holds the newest tag; SAVE_DIR/global_stepN/ holds the engine's files,
plus our config.json (the HF model config) and run.json (run + DeepSpeed config), so a tag folder is
self-describing: conversion and inspection need nothing else.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError

TAG_RE = re.compile(r"^global_step(\d+)$")
CLIENT_STATE_VERSION = 1


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def step_of_tag(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def local_tags(save_dir: Path) -> list[str]:
    """Tags present in save_dir, oldest first (by step number, not by name)."""
    if not save_dir.is_dir():
        return []
    tags = [p.name for p in save_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
    return sorted(tags, key=lambda t: step_of_tag(t))


def resolve_resume_tag(save_dir: Path, resume: str) -> str:
    """`latest` -> the tag in SAVE_DIR/latest; anything else must be a tag folder in save_dir."""
    if resume == "latest":
        pointer = save_dir / "latest"
        if not pointer.is_file():
            raise ConfigError(f"--resume latest: no checkpoint in {save_dir} (no 'latest' file); start without --resume")
        tag = pointer.read_text().strip()
    else:
        tag = resume
    if not (save_dir / tag).is_dir():
        have = ", ".join(local_tags(save_dir)) or "none"
        raise ConfigError(f"--resume {resume}: checkpoint tag {tag!r} not found in {save_dir} (available: {have})")
    return tag


@dataclass(frozen=True)
class TrainState:
    """What the loop needs to continue exactly where a checkpoint left off."""

    step: int
    consumed_samples: int


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def client_state(
    *, state: TrainState, run_config: dict, ds_config: dict, model_config: dict, dp_size: int
) -> dict[str, Any]:
    return {
        "neox_train_version": CLIENT_STATE_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "dp_size": dp_size,
        "run_config": run_config,
        "ds_config": ds_config,
        "model_config": model_config,
        "rng": rng_state(),
    }


def save(engine, save_dir: Path, state: TrainState, extra: dict[str, Any], *, is_rank0: bool) -> str:
    """Save on every rank (DeepSpeed hangs otherwise); rank 0 then adds the JSON side files.

    When `save_checkpoint` returns, every rank's files are written (its final barrier), so the side files
    and anything that reacts to the tag (retention now, the upload queue later) see a finished checkpoint.
    """
    tag = tag_for_step(state.step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=extra)
    if is_rank0:
        tag_dir = save_dir / tag
        (tag_dir / "config.json").write_text(json.dumps(extra["model_config"], indent=2, sort_keys=True) + "\n")
        run = {k: extra[k] for k in ("step", "consumed_samples", "dp_size", "run_config", "ds_config")}
        (tag_dir / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    return tag


def check_compatible(saved: dict[str, Any], *, model_config: dict, ds_config: dict, dp_size: int, tag: str) -> None:
    """Refuse a resume that would silently train a different model or fail deep inside DeepSpeed."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    old_model = saved.get("model_config", {})
    diffs = [f"{k} {old_model.get(k)} -> {model_config.get(k)}" for k in keys if old_model.get(k) != model_config.get(k)]
    if diffs:
        raise ConfigError(f"checkpoint {tag} holds a different model ({'; '.join(diffs)}): resume with the same model preset and vocab")
    old_stage = saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    new_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    old_dp = saved.get("dp_size")
    if (old_dp != dp_size or old_stage != new_stage) and max(old_stage, new_stage) >= 1:
        raise ConfigError(
            f"checkpoint {tag} was saved at data-parallel size {old_dp} with ZeRO-{old_stage}; this run is {dp_size} "
            f"with ZeRO-{new_stage}: partitioned optimizer state needs a DeepSpeed universal checkpoint "
            f"(python -m deepspeed.checkpoint.ds_to_universal) to change either"
        )


def load(engine, save_dir: Path, tag: str, *, model_config: dict, ds_config: dict, dp_size: int) -> TrainState:
    """Load weights, optimizer, scheduler (DeepSpeed) and restore the RNG and data position (ours)."""
    meta_path = save_dir / tag / "run.json"
    if meta_path.is_file():
        saved_meta = json.loads(meta_path.read_text())
        saved_meta["model_config"] = json.loads((save_dir / tag / "config.json").read_text())
        check_compatible(saved_meta, model_config=model_config, ds_config=ds_config, dp_size=dp_size, tag=tag)
    path, saved = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise ConfigError(f"checkpoint {save_dir / tag} could not be loaded by DeepSpeed (missing model states)")
    if saved.get("neox_train_version") != CLIENT_STATE_VERSION:
        raise ConfigError(f"checkpoint {save_dir / tag} was not written by neox-train (no data position in it)")
    set_rng_state(saved["rng"])
    return TrainState(step=int(saved["step"]), consumed_samples=int(saved["consumed_samples"]))


def apply_retention(save_dir: Path, keep_last_n: int) -> list[str]:
    """Delete all but the newest `keep_last_n` tags (0 keeps all). Never deletes the tag `latest` names."""
    if keep_last_n <= 0:
        return []
    tags = local_tags(save_dir)
    pointer = save_dir / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    doomed = [t for t in tags[:-keep_last_n] if t != latest]
    for tag in doomed:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
    return doomed
