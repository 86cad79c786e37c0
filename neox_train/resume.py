"""Where a run resumes from, decided in three phases around process-group creation.

1. `locate` (before anything heavy): `--resume latest|TAG` in save_dir, or a bucket URL to download from.
2. `check` (before the model is built): the checkpoint holds this run's model and data order.
3. `finish` (after the process group exists, because the other ranks must wait): download from the bucket, and
   when the data-parallel size or ZeRO stage changed since the save, convert the tag to a DeepSpeed universal
   checkpoint (`deepspeed.checkpoint.ds_to_universal`) and load it with `load_universal`, so the same model and
   optimizer state continue on another GPU count. The data position is counted in global samples, so it carries
   over unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ConfigError, RunConfig
from .metrics import log

UNIVERSAL_SUFFIX = "_universal"


@dataclass(frozen=True)
class ResumePoint:
    requested: str | None  # the --resume value
    remote: str | None  # bucket URL to download from (phase 3)
    tag: str | None  # local tag, when known before the process group exists


def remote_resume_source(run: RunConfig, resume: str | None) -> str | None:
    """The bucket URL to resume from, or None for a local resume (or none at all).

    `--resume gs://...` (or file://) names it; `--resume latest` with sync_to set and no local checkpoint falls
    back to the bucket, so a fresh machine continues where the last one published."""
    if not resume:
        return None
    if "://" in resume:
        return resume
    if resume == "latest" and run.sync_to and not (Path(run.save_dir) / "latest").is_file():
        return run.sync_to
    return None


def locate(run: RunConfig, resume: str | None) -> ResumePoint:
    remote = remote_resume_source(run, resume)
    tag = checkpoint.resolve_resume_tag(Path(run.save_dir), resume) if resume and not remote else None
    return ResumePoint(resume, remote, tag)


def check(plan, point: ResumePoint, data_tokens: int) -> None:
    if point.tag:
        check_resume(plan, point.tag, data_tokens)


def check_resume(plan, tag: str, data_tokens: int) -> dict[str, Any] | None:
    """Before the model is built: is the checkpoint this run's model and data order? Returns the saved meta."""
    saved = checkpoint.read_saved_meta(Path(plan.run.save_dir), tag)
    if saved is not None:
        checkpoint.check_compatible(
            saved, model_config=plan.model_config.to_dict(), ds_config=plan.ds_config, dp_size=plan.dp_size,
            tag=tag, run_config=plan.run.to_dict(), data_tokens=data_tokens,
        )
    return saved


def fetch_remote_checkpoint(url: str, run: RunConfig) -> str:
    """Download the newest COMPLETE checkpoint at `url` into save_dir (verified against its manifest)."""
    from .storage import StorageError, open_backend
    from .sync import fetch_checkpoint, remote_latest

    backend = open_backend(url, credentials=run.credentials)
    tag = remote_latest(backend)
    if tag is None:
        raise StorageError(f"--resume: no COMPLETE checkpoint under {url} (a checkpoint counts once its COMPLETE marker exists)")
    log.info("resume: downloading %s from %s", tag, url)
    fetch_checkpoint(backend, tag, Path(run.save_dir), progress=True)
    return tag


def finish(plan, point: ResumePoint, data_tokens: int, *, topo, node_local: bool):
    """Phase 3, on every rank: returns (plan, tag to load) — the plan gains `load_universal` when converted."""
    import deepspeed.comm as dist

    from .publish import is_uploader

    tag = point.tag
    converter = is_uploader(topo, node_local)  # the rank that holds (and downloads) this node's copy
    if point.remote:
        if converter:
            fetch_remote_checkpoint(point.remote, plan.run)
        dist.barrier()
        tag = checkpoint.resolve_resume_tag(Path(plan.run.save_dir), "latest")
        check_resume(plan, tag, data_tokens)
    if not tag:
        return plan, None
    saved = checkpoint.read_saved_meta(Path(plan.run.save_dir), tag)
    change = checkpoint.partitioning_change(saved, ds_config=plan.ds_config, dp_size=plan.dp_size) if saved else None
    if change is None:
        return plan, tag
    universal = tag + UNIVERSAL_SUFFIX
    if converter:
        log.info("resume: %s; converting %s to a DeepSpeed universal checkpoint (%s)", change, tag, universal)
        to_universal(Path(plan.run.save_dir), tag)
    dist.barrier()
    ds_config = {**plan.ds_config, "checkpoint": {**plan.ds_config.get("checkpoint", {}), "load_universal": True}}
    return dataclasses.replace(plan, ds_config=ds_config), universal


def to_universal(save_dir: Path, tag: str) -> Path:
    """`python -m deepspeed.checkpoint.ds_to_universal` on save_dir/tag -> save_dir/tag_universal (DeepSpeed's own
    tool; a separate process so its worker pool and memory go away with it). A finished conversion is reused."""
    src, out = save_dir / tag, save_dir / (tag + UNIVERSAL_SUFFIX)
    done = out / ".neox-universal-complete"
    if done.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # a half-written conversion from a crash
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", str(min(4, os.cpu_count() or 1)),
           "--num_merge_workers", str(min(2, os.cpu_count() or 1))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"converting {src} to a universal checkpoint failed ({last}); the original checkpoint is untouched")
    done.write_text(tag + "\n")
    log.info("resume: universal checkpoint %s written in %.1f s", out, time.perf_counter() - started)
    return out


def after_load(plan, tag: str | None, *, topo, node_local: bool) -> None:
    """Once every rank has loaded a converted copy it is dead weight (the next save is a normal tag at the new
    size); a crash before that save simply converts again."""
    if not (tag and tag.endswith(UNIVERSAL_SUFFIX)):
        return
    import deepspeed.comm as dist

    from .publish import is_uploader

    dist.barrier()
    if is_uploader(topo, node_local):
        save_dir = Path(plan.run.save_dir)
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        (save_dir / "latest_universal").unlink(missing_ok=True)
