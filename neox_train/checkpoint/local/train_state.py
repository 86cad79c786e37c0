"""What a checkpoint holds beside DeepSpeed's files (data position, configs, RNG: the train state
and side files), the checks before a tag is written or resumed, loading, and local keep-last-N
retention. Saving itself goes through saver.py, the one save path; a saved tag counts once committed
(commit.py).

Layout: SAVE_DIR/latest names the newest complete tag; SAVE_DIR/global_stepN/ holds the engine's
files, plus our config.json (the HF model config), run.json (run + DeepSpeed config, run id) and the
completeness marker, so a tag folder is self-describing: conversion and inspection need nothing
else.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.tags import CONFIG_JSON, DATA_SIDE_FILES, RUN_JSON, read_tag_json
from neox_train.data.shards import dataset_folder
from neox_train.ds_config import zero_stage
from neox_train.errors import CheckpointError, ConfigError
from neox_train.log import log
from neox_train.units import human_bytes

CLIENT_STATE_VERSION = 1


@dataclass(frozen=True)
class TrainState:
    """What the loop needs to continue exactly where a checkpoint left off."""

    step: int
    consumed_samples: int
    guard: dict[str, Any] | None = None  # the loss guard's window and counters (train.guard)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
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
    *, state: TrainState, run_config: dict, ds_config: dict, model_config: dict, dp_size: int,
    data_tokens: int
) -> dict[str, Any]:
    return {
        "neox_train_version": CLIENT_STATE_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "guard": state.guard,
        "dp_size": dp_size,
        "data_tokens": data_tokens,
        "run_config": run_config,
        "ds_config": ds_config,
        "model_config": model_config,
        "rng": rng_state(),
    }


def prepare_tag(save_dir: Path, tag: str) -> None:
    """On the folder's owner, before any rank writes `tag`: a complete tag is never written over (a
    damaged one is moved aside, kept for inspection), and a torn earlier save of this step is
    removed (its files must not mix in).
    """
    tag_dir = save_dir / tag
    existing = commit.inspect(save_dir, tag)
    if existing.complete:
        problem = commit.verify(save_dir, existing)
        if not problem:
            raise CheckpointError(
                f"{tag_dir} is already a complete checkpoint; refusing to write over it")
        # A tag the resume skipped as damaged: kept for inspection, out of the way of this step's
        # new save.
        aside = save_dir / f"{tag}.damaged-{uuid.uuid4().hex[:8]}"
        os.replace(tag_dir, aside)
        log.warning("moved the damaged checkpoint %s (%s) aside to %s", tag_dir, problem,
                    aside.name)
    commit.remove_incomplete(save_dir, tag)


def write_side_files(tag_dir: Path, extra: dict[str, Any], *, run_id: str | None,
                     losses: dict[str, Any] | None) -> None:
    """Our files next to DeepSpeed's: config.json (the HF model config), run.json (run + DeepSpeed
    config, run id, the newest losses) and the data's tokenizer files, so a tag folder is
    self-describing."""
    (tag_dir / CONFIG_JSON).write_text(
        json.dumps(extra["model_config"], indent=2, sort_keys=True) + "\n")
    run = {k: extra[k] for k in ("step", "consumed_samples", "dp_size", "data_tokens", "run_config",
                                 "ds_config")}
    run["run_id"] = run_id
    # train_loss, val_loss, val_loss_step: what the model card of an export reports
    run.update(losses or {})
    (tag_dir / RUN_JSON).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    run = extra["run_config"]
    # The tokenizer and meta.json beside the data (the mixture's first dataset), for the HF export.
    data_dir = dataset_folder(
        (run.get("data") or [{}])[0].get("path") or run.get("data_dir") or ".")
    for name in DATA_SIDE_FILES:
        if (data_dir / name).is_file():
            shutil.copy2(data_dir / name, tag_dir / name)


def save_failed(save_dir: Path, tag: str, err: BaseException | str,
                expected_bytes: int | None) -> CheckpointError:
    """The one line for a save that could not be written (`err`: the exception, or a writer's
    one-line report)."""
    free = free_bytes(save_dir)
    latest, _ = commit.read_latest(save_dir)
    kept = f"latest still names {latest}" if latest else "no earlier checkpoint exists"
    need = f", the checkpoint needs about {human_bytes(expected_bytes)}" if expected_bytes else ""
    text = " ".join(str(err).split())
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in text or \
        (expected_bytes is not None and free < expected_bytes) or "file write failed" in text
    if full:
        return CheckpointError(
            f"cannot save checkpoint {tag} in {save_dir}: the disk is full ({human_bytes(free)} "
            f"free{need}); the partial {tag} was removed, {kept} and the earlier checkpoints are "
            "intact: free space (or lower keep_last_n, or point --save-dir at a larger disk), then "
            "continue with --resume latest")
    kind = f"{type(err).__name__}: " if isinstance(err, BaseException) else ""
    return CheckpointError(f"cannot save checkpoint {tag} in {save_dir}: {kind}{text[:300]}; the "
                           f"partial {tag} was removed, {kept} and the earlier checkpoints are "
                           "intact")


def free_bytes(save_dir: Path) -> int:
    return shutil.disk_usage(save_dir if save_dir.exists() else save_dir.parent).free


def remove_tag(save_dir: Path, tag: str) -> None:
    shutil.rmtree(Path(save_dir) / tag, ignore_errors=True)


def space_warning(save_dir: Path, tag: str, expected_bytes: int) -> str:
    """"" when the next checkpoint fits on the disk of save_dir, else the warning to log."""
    free = free_bytes(save_dir)
    if free >= expected_bytes:
        return ""
    return (f"the next checkpoint ({tag}, about {human_bytes(expected_bytes)}) will not fit in "
            f"{save_dir} ({human_bytes(free)} free): free space, lower keep_last_n, or point "
            "--save-dir at a larger disk")


# Run-config fields that decide which windows `consumed_samples` points at: changing one on resume
# would silently continue on different data.
DATA_ORDER_FIELDS = ("seq_len", "seed", "val_fraction", "max_shards", "data")


def check_compatible(
    saved: dict[str, Any], *, model_config: dict, ds_config: dict, dp_size: int, tag: str,
    run_config: dict | None = None, data_tokens: int | None = None,
) -> None:
    """Refuse a resume that would silently train a different model, on different data, or fail deep
    inside DeepSpeed. `saved` is the tag's run.json plus its config.json under "model_config"."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
    old_model = saved.get("model_config", {})
    diffs = [f"{k} {old_model.get(k)} -> {model_config.get(k)}" for k in keys
             if old_model.get(k) != model_config.get(k)]
    if diffs:
        raise ConfigError(f"checkpoint {tag} holds a different model ({'; '.join(diffs)}): resume "
                          f"with the same model preset and vocab")
    if run_config is not None:
        old_run = saved.get("run_config", {})
        allowed = run_config.get("allow_data_change")
        fields = [k for k in DATA_ORDER_FIELDS if not (allowed and k == "data")]
        diffs = [f"{k} {old_run.get(k)!r} -> {run_config.get(k)!r}" for k in fields
                 if k in old_run and old_run.get(k) != run_config.get(k)]
        if (data_tokens is not None and saved.get("data_tokens") not in (None, data_tokens)
                and not allowed):
            diffs.append(f"data tokens {saved['data_tokens']} -> {data_tokens}")
        if diffs:
            mixture = " (a changed mixture: --allow-data-change continues in the new one)" if \
                any(d.startswith(("data ", "data tokens")) for d in diffs) else ""
            raise ConfigError(
                f"checkpoint {tag} was trained on a different data order ({'; '.join(diffs)}): its "
                "data position would point at other samples; resume with the same data and "
                f"settings{mixture}"
            )
    change = partitioning_change(saved, ds_config=ds_config, dp_size=dp_size)
    if change is not None and not universal_convertible(saved, ds_config):
        raise ConfigError(
            f"checkpoint {tag}: {change}, and a ZeRO-0 checkpoint (no partitioned fp32 optimizer "
            "state) can only be resumed with ZeRO-0; resume it with its own ZeRO stage (any number "
            f"of ranks), or with ZeRO-1..3 on both sides"
        )


def partitioning_change(saved: dict[str, Any], *, ds_config: dict, dp_size: int) -> str | None:
    """How the saved partitioning differs from this run's, when DeepSpeed cannot load it directly;
    else None.

    ZeRO-1..3 shard the optimizer state (ZeRO-3 also the weights) by data-parallel rank, so a change
    of either needs a universal checkpoint. ZeRO-0 keeps whole replicas: any rank count loads it."""
    old_stage, new_stage = zero_stage(saved.get("ds_config", {})), zero_stage(ds_config)
    old_dp = saved.get("dp_size")
    if (old_dp != dp_size or old_stage != new_stage) and max(old_stage, new_stage) >= 1:
        return (f"saved at data-parallel size {old_dp} with ZeRO-{old_stage}, this run is "
                f"{dp_size} with ZeRO-{new_stage}")
    return None


def universal_convertible(saved: dict[str, Any], ds_config: dict) -> bool:
    """deepspeed.checkpoint.ds_to_universal reads ZeRO-1..3 optimizer shards, and load_universal
    restores into a ZeRO-1..3 optimizer: ZeRO-0 on either side has nothing to convert from or
    into."""
    return zero_stage(saved.get("ds_config", {})) >= 1 and zero_stage(ds_config) >= 1


def read_saved_meta(save_dir: Path, tag: str) -> dict[str, Any] | None:
    """run.json + config.json of a tag (None for a checkpoint without them, e.g. not written by
    neox-train)."""
    meta = read_tag_json(save_dir / tag, RUN_JSON, error=CheckpointError)
    if meta is None:
        return None
    meta["model_config"] = read_tag_json(save_dir / tag, CONFIG_JSON, error=CheckpointError) or {}
    return meta


@contextmanager
def each_file_read_once(engine) -> Iterator[None]:
    """While DeepSpeed loads a checkpoint, its second read of the same file returns the first's
    object. Its loader reads the model-states file twice: SDLoaderBase.check_ckpt_list loads it
    whole only to look up mp_world_size and drops it, then SDLoaderBase.load reads it again
    (0.55 s per GB each on CPU, measured). Both pass the same identity map_location, and the check
    only reads a key, so the first object serves the second read; the memo holds one file, once."""
    ckpt = engine.checkpoint_engine
    read = ckpt.load
    last: dict[str, Any] = {}

    def load_once(path, map_location=None):
        if callable(map_location) and last.get("path") == str(path):
            state = last.pop("state")
            last.clear()
            return state
        state = read(path, map_location=map_location)
        last.clear()
        if callable(map_location):  # the loader's identity function, as both of its reads pass
            last.update(path=str(path), state=state)
        return state

    ckpt.load = load_once
    try:
        yield
    finally:
        del ckpt.load  # the class's method again
        last.clear()


def load(engine, save_dir: Path, tag: str) -> TrainState:
    """Load weights, optimizer, scheduler (DeepSpeed) and restore the RNG and data position (ours).
    Compatibility was checked before the engine was built (check_compatible)."""
    with each_file_read_once(engine):
        path, saved = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise ConfigError(
            f"checkpoint {save_dir / tag} could not be loaded by DeepSpeed (missing model states)")
    if saved.get("neox_train_version") != CLIENT_STATE_VERSION:
        raise ConfigError(
            f"checkpoint {save_dir / tag} was not written by neox-train (no data position in it)")
    set_rng_state(saved["rng"])
    refresh = getattr(engine.lr_scheduler, "refresh", None)
    if refresh is not None:  # a schedule of this run's settings (wsd: train/schedule.py)
        refresh()
    return TrainState(step=int(saved["step"]), consumed_samples=int(saved["consumed_samples"]),
                      guard=saved.get("guard"))


def apply_retention(save_dir: Path, keep_last_n: int, *,
                    may_delete: Callable[[str], bool] | None = None) -> list[str]:
    """Delete all but the newest `keep_last_n` complete tags (0 keeps all). Never deletes the tag
    `latest` names, a tag `may_delete` refuses (one not yet verified in the bucket), nor an
    incomplete tag (the next save of that step replaces it)."""
    if keep_last_n <= 0:
        return []
    tags = commit.complete_tags(save_dir)
    latest, _ = commit.read_latest(save_dir)
    doomed = [t for t in tags[:-keep_last_n]
              if t != latest and (may_delete is None or may_delete(t))]
    for tag in doomed:
        remove_tag(save_dir, tag)
    return doomed
