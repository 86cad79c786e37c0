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
from typing import Any, Callable

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
    *, state: TrainState, run_config: dict, ds_config: dict, model_config: dict, dp_size: int, data_tokens: int
) -> dict[str, Any]:
    return {
        "neox_train_version": CLIENT_STATE_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "dp_size": dp_size,
        "data_tokens": data_tokens,
        "run_config": run_config,
        "ds_config": ds_config,
        "model_config": model_config,
        "rng": rng_state(),
    }


# Copied from the data folder into every tag, so a checkpoint converted elsewhere (from a bucket) still carries the
# tokenizer it was trained with.
DATA_SIDE_FILES = ("tokenizer.json", "meta.json")


def save(engine, save_dir: Path, state: TrainState, extra: dict[str, Any], *, is_rank0: bool,
         losses: dict[str, Any] | None = None) -> str:
    """Save on every rank (DeepSpeed hangs otherwise); rank 0 then adds the JSON side files.

    When `save_checkpoint` returns, every rank's files are written (its final barrier), so the side files
    and anything that reacts to the tag (retention now, the upload queue later) see a finished checkpoint.
    """
    tag = tag_for_step(state.step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=extra)
    if is_rank0:
        tag_dir = save_dir / tag
        (tag_dir / "config.json").write_text(json.dumps(extra["model_config"], indent=2, sort_keys=True) + "\n")
        run = {k: extra[k] for k in ("step", "consumed_samples", "dp_size", "data_tokens", "run_config", "ds_config")}
        run.update(losses or {})  # train_loss, val_loss, val_loss_step: what the model card of an export reports
        (tag_dir / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
        data_dir = Path(extra["run_config"].get("data_dir") or ".")
        for name in DATA_SIDE_FILES:
            if (data_dir / name).is_file():
                shutil.copy2(data_dir / name, tag_dir / name)
    return tag


# Run-config fields that decide which windows `consumed_samples` points at: changing one on resume would
# silently continue on different data.
DATA_ORDER_FIELDS = ("seq_len", "seed", "val_fraction", "max_shards")


def check_compatible(
    saved: dict[str, Any], *, model_config: dict, ds_config: dict, dp_size: int, tag: str,
    run_config: dict | None = None, data_tokens: int | None = None,
) -> None:
    """Refuse a resume that would silently train a different model, on different data, or fail deep inside
    DeepSpeed. `saved` is the tag's run.json plus its config.json under "model_config"."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    old_model = saved.get("model_config", {})
    diffs = [f"{k} {old_model.get(k)} -> {model_config.get(k)}" for k in keys if old_model.get(k) != model_config.get(k)]
    if diffs:
        raise ConfigError(f"checkpoint {tag} holds a different model ({'; '.join(diffs)}): resume with the same model preset and vocab")
    if run_config is not None:
        old_run = saved.get("run_config", {})
        diffs = [f"{k} {old_run.get(k)!r} -> {run_config.get(k)!r}" for k in DATA_ORDER_FIELDS
                 if k in old_run and old_run.get(k) != run_config.get(k)]
        if data_tokens is not None and saved.get("data_tokens") not in (None, data_tokens):
            diffs.append(f"data tokens {saved['data_tokens']} -> {data_tokens}")
        if diffs:
            raise ConfigError(
                f"checkpoint {tag} was trained on a different data order ({'; '.join(diffs)}): its data position would "
                f"point at other samples; resume with the same data and settings"
            )
    change = partitioning_change(saved, ds_config=ds_config, dp_size=dp_size)
    if change is not None and not universal_convertible(saved, ds_config):
        raise ConfigError(
            f"checkpoint {tag}: {change}, and a ZeRO-0 checkpoint (no partitioned fp32 optimizer state) can only be "
            f"resumed with ZeRO-0; resume it with its own ZeRO stage (any number of ranks), or with ZeRO-1..3 on both sides"
        )


def _stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def partitioning_change(saved: dict[str, Any], *, ds_config: dict, dp_size: int) -> str | None:
    """How the saved partitioning differs from this run's, when DeepSpeed cannot load it directly; else None.

    ZeRO-1..3 shard the optimizer state (ZeRO-3 also the weights) by data-parallel rank, so a change of either
    needs a universal checkpoint. ZeRO-0 keeps whole replicas: any rank count loads it."""
    old_stage, new_stage = _stage(saved.get("ds_config", {})), _stage(ds_config)
    old_dp = saved.get("dp_size")
    if (old_dp != dp_size or old_stage != new_stage) and max(old_stage, new_stage) >= 1:
        return f"saved at data-parallel size {old_dp} with ZeRO-{old_stage}, this run is {dp_size} with ZeRO-{new_stage}"
    return None


def universal_convertible(saved: dict[str, Any], ds_config: dict) -> bool:
    """deepspeed.checkpoint.ds_to_universal reads ZeRO-1..3 optimizer shards, and load_universal restores into a
    ZeRO-1..3 optimizer: ZeRO-0 on either side has nothing to convert from or into."""
    return _stage(saved.get("ds_config", {})) >= 1 and _stage(ds_config) >= 1


def read_saved_meta(save_dir: Path, tag: str) -> dict[str, Any] | None:
    """run.json + config.json of a tag (None for a checkpoint without them, e.g. not written by neox-train)."""
    meta_path = save_dir / tag / "run.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    meta["model_config"] = json.loads((save_dir / tag / "config.json").read_text())
    return meta


def load(engine, save_dir: Path, tag: str) -> TrainState:
    """Load weights, optimizer, scheduler (DeepSpeed) and restore the RNG and data position (ours).
    Compatibility was checked before the engine was built (check_compatible)."""
    path, saved = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise ConfigError(f"checkpoint {save_dir / tag} could not be loaded by DeepSpeed (missing model states)")
    if saved.get("neox_train_version") != CLIENT_STATE_VERSION:
        raise ConfigError(f"checkpoint {save_dir / tag} was not written by neox-train (no data position in it)")
    set_rng_state(saved["rng"])
    return TrainState(step=int(saved["step"]), consumed_samples=int(saved["consumed_samples"]))


def apply_retention(save_dir: Path, keep_last_n: int, *, may_delete: Callable[[str], bool] | None = None) -> list[str]:
    """Delete all but the newest `keep_last_n` tags (0 keeps all). Never deletes the tag `latest` names, nor a tag
    `may_delete` refuses (one not yet verified in the bucket)."""
    if keep_last_n <= 0:
        return []
    tags = local_tags(save_dir)
    pointer = save_dir / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    doomed = [t for t in tags[:-keep_last_n] if t != latest and (may_delete is None or may_delete(t))]
    for tag in doomed:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
    return doomed
