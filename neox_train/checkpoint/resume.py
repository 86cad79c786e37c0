"""Where a run resumes from, decided in three phases around process-group creation.

1. `locate` (every rank, before anything heavy; reads markers and pointers, no checkpoint content):
   the local candidates. `--resume latest` takes every complete tag, newest first, whatever
   SAVE_DIR/latest says (a missing, empty, torn or stale pointer costs one WARNING line, never a
   fresh start); `--resume TAG` takes that tag, which must be complete; a URL, or `latest` with no
   local checkpoint and sync_to set, means the bucket. A start without --resume in a save dir that
   holds complete checkpoints is refused: it would write over them.
2. `check` (before the model is built): the candidate holds this run's model and data order.
3. `finish` (after the process group exists, because the other ranks must wait):
   - the ranks that own the checkpoint folders read every file of the candidate and compare it with
     the tag's marker (crc32c); a damaged tag falls back to the next complete one with one WARNING
     line (a named tag is an error instead), and all ranks agree on the step;
   - with `--resume latest` and sync_to, global rank 0 compares with the bucket's newest COMPLETE
     checkpoint: when it is newer and of the same run, it wins (a stale save dir never rewinds a run
     silently), and the log says which was taken over which;
   - a bucket checkpoint is downloaded and verified against its manifest, then committed locally;
   - when the data-parallel size or ZeRO stage changed since the save, the tag is converted to a
     DeepSpeed universal checkpoint (`deepspeed.checkpoint.ds_to_universal`) and loaded with
     `load_universal`, so the same model and optimizer state continue on another GPU count. The data
     position is counted in global samples, so it carries over unchanged.
   It returns the tag to load and the run's identity: the id of the checkpoint resumed (a fresh run
   draws a new one) and a new session id, the same on every rank.
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

import deepspeed.comm as dist

from neox_train.checkpoint.local import commit, train_state
from neox_train.checkpoint.local.tags import step_of_tag, tag_for_step
from neox_train.checkpoint.publish.fetch import fetch_checkpoint, remote_latest, remote_manifest
from neox_train.checkpoint.publish.journal import journal_published
from neox_train.checkpoint.publish.owner import Identity, new_id, valid_id
from neox_train.checkpoint.publish.settings import folder_node, is_publishing_rank
from neox_train.config import RESUME_AUTO, RunConfig
from neox_train.distributed import collective_ints
from neox_train.errors import CheckpointError, ConfigError, StorageError
from neox_train.log import log
from neox_train.remote import open_backend

UNIVERSAL_SUFFIX = "_universal"
_NONE = -1  # no checkpoint
_REFUSED = -2  # the named checkpoint is damaged: every rank stops


@dataclass(frozen=True)
class ResumePoint:
    candidates: tuple[str, ...] = ()  # local complete tags to try, in order
    named: bool = False  # the user named the tag (or URL): damage is an error, not a fallback
    # the bucket: the source when remote_only, else compared with (--resume latest)
    remote: str | None = None
    remote_only: bool = False
    # --resume auto: no checkpoint in the bucket either means a start from step 0
    fresh_if_none: bool = False
    note: str = ""  # what is wrong with SAVE_DIR/latest, for the one WARNING line
    run_id: str | None = None  # the id this resume inherits, as far as known before the download


def _names(tags: list[str], n: int = 3) -> str:
    return ", ".join(tags[-n:]) + (f" (and {len(tags) - n} older)" if len(tags) > n else "")


def locate_resume(run: RunConfig, resume: str | None) -> ResumePoint:
    save_dir = Path(run.save_dir)
    statuses = commit.statuses(save_dir)
    complete = [s for s in statuses if s.complete]
    if not resume:
        if complete:
            raise ConfigError(
                f"{save_dir} holds checkpoints ({_names([s.tag for s in complete])}) that a run "
                "from step 0 would write over: continue that run with --resume latest, or train "
                "from scratch with another --save-dir")
        return ResumePoint()
    if "://" in resume:
        return ResumePoint(named=True, remote=resume, remote_only=True)
    if resume == "latest":
        return _locate_latest(run, save_dir, statuses)
    if resume == RESUME_AUTO:
        return _locate_auto(run, save_dir, statuses)
    return _locate_named(resume, save_dir, statuses)


def _latest_note(save_dir: Path, statuses: list[commit.TagStatus], newest: str) -> str:
    """What is wrong with SAVE_DIR/latest when it does not name the newest complete tag ("" when it
    does)."""
    pointer, why = commit.read_latest(save_dir)
    if pointer == newest:
        return ""
    named = next((s for s in statuses if s.tag == pointer), None)
    if pointer is None:
        reason = why
    elif named is None:
        reason = f"names {pointer}, which does not exist"
    elif not named.complete:
        reason = f"names {pointer}, which is incomplete ({named.problem})"
    else:
        reason = f"names {pointer}, older than the newest complete checkpoint"
    return f"{save_dir / 'latest'} {reason}: resuming from the newest complete checkpoint {newest}"


def _locate_latest(run: RunConfig, save_dir: Path, statuses: list[commit.TagStatus]) -> ResumePoint:
    complete = [s for s in statuses if s.complete]
    if complete:
        tags = [s.tag for s in reversed(complete)]
        return ResumePoint(tuple(tags), remote=run.sync_to,
                           note=_latest_note(save_dir, statuses, tags[0]),
                           run_id=complete[-1].run_id)
    torn = "; ".join(f"{s.tag}: {s.problem}" for s in statuses[-3:])
    if run.sync_to:
        note = (f"no complete checkpoint in {save_dir} ({torn}); resuming from {run.sync_to}"
                if statuses else "")
        return ResumePoint(remote=run.sync_to, remote_only=True, note=note)
    if statuses:
        raise ConfigError(
            f"--resume latest: no complete checkpoint in {save_dir} ({torn}): nothing to resume, "
            "and a run from step 0 would replace those folders; to start over, run without "
            f"--resume (the incomplete folders are replaced as their steps are saved again)")
    raise ConfigError(f"--resume latest: no checkpoint in {save_dir} (no global_stepN folder); "
                      f"start without --resume")


def _locate_auto(run: RunConfig, save_dir: Path, statuses: list[commit.TagStatus]) -> ResumePoint:
    """`latest` where a complete checkpoint exists (here, else at sync_to); else a start from step
    0, which replaces incomplete folders as their steps are saved again."""
    if any(s.complete for s in statuses):
        return _locate_latest(run, save_dir, statuses)
    if run.sync_to:
        return ResumePoint(remote=run.sync_to, remote_only=True, fresh_if_none=True)
    if statuses:
        log.info("resume auto: no complete checkpoint in %s yet: starting from step 0", save_dir)
    return ResumePoint()


def _locate_named(resume: str, save_dir: Path, statuses: list[commit.TagStatus]) -> ResumePoint:
    complete = [s for s in statuses if s.complete]
    named = next((s for s in statuses if s.tag == resume), None)
    have = _names([s.tag for s in complete]) if complete else "none"
    torn = [s.tag for s in statuses if not s.complete]
    if torn:
        have += f"; incomplete: {_names(torn)}"
    if named is None:
        raise ConfigError(f"--resume {resume}: checkpoint tag {resume!r} not found in {save_dir} "
                          f"(complete ones: {have})")
    if not named.complete:
        raise ConfigError(f"--resume {resume}: {save_dir / resume} is not a complete checkpoint "
                          f"({named.problem}); complete ones: {have}")
    newer = [s.tag for s in complete if (step_of_tag(s.tag) or 0) > (step_of_tag(resume) or 0)]
    if newer:
        raise ConfigError(
            f"--resume {resume}: {save_dir} also holds newer checkpoints ({_names(newer)}), which "
            "this run would write over as it saves those steps again; resume the newest (--resume "
            f"latest), or copy {resume} into another --save-dir to branch from it")
    return ResumePoint((resume,), named=True, run_id=named.run_id)


def remote_run_id(url: str, credentials: str | None) -> str | None:
    """The run id of the newest COMPLETE checkpoint at url (what a resume from there inherits)."""

    backend = open_backend(url, credentials=credentials, start_up=True)
    tag = remote_latest(backend)
    manifest = remote_manifest(backend, tag) if tag else None
    return manifest.get("run_id") if manifest else None


def check_resume_point(plan, point: ResumePoint, data_tokens: int) -> None:
    if point.candidates:
        try:
            check_resume(plan, point.candidates[0], data_tokens)
        except CheckpointError:
            if point.named or len(point.candidates) == 1:
                raise
            # unreadable side files: finish_resume() verifies the tag, reports it and falls back


def check_resume(plan, tag: str, data_tokens: int) -> dict[str, Any] | None:
    """Before the model is built: is the checkpoint this run's model and data order? Returns the
    saved meta."""
    saved = train_state.read_saved_meta(Path(plan.run.save_dir), tag)
    if saved is not None:
        train_state.check_compatible(
            saved, model_config=plan.model_config.to_dict(), ds_config=plan.ds_config,
            dp_size=plan.dp_size, tag=tag, run_config=plan.run.to_dict(), data_tokens=data_tokens,
        )
    return saved


def fetch_remote_checkpoint(url: str, run: RunConfig, tag: str) -> str:
    """Download COMPLETE checkpoint `tag` at `url` into save_dir (verified against its manifest)."""

    log.info("resume: downloading %s from %s", tag, url)
    fetch_checkpoint(open_backend(url, credentials=run.credentials, streams=run.transfer_streams),
                     tag, Path(run.save_dir), workers=run.transfer_streams, progress=True)
    return tag


_NO_OPINION = 2**62  # a rank that owns no checkpoint folder: the minimum is the owners'


def _verified_step(save_dir: Path, point: ResumePoint, owner: bool) -> tuple[int, str]:
    """On the folder owners, the newest candidate whose files all match its marker: (step, the
    warning about the ones skipped). _NONE when none is intact, _REFUSED when a named tag is
    damaged."""
    if not owner:
        return _NO_OPINION, ""
    skipped = []
    for tag in point.candidates:
        status = commit.inspect(save_dir, tag)
        problem = status.problem or commit.verify(save_dir, status)
        if not problem:
            if skipped:
                return step_of_tag(tag), (f"{'; '.join(skipped)}: resuming from the newest intact "
                                          f"checkpoint {tag}")
            return step_of_tag(tag), ""
        if point.named:
            return _REFUSED, f"checkpoint {save_dir / tag} is damaged: {problem}"
        skipped.append(f"{tag} is damaged ({problem})")
    return _NONE, f"every complete checkpoint in {save_dir} is damaged: {'; '.join(skipped)}"


def _agree_local(save_dir: Path, point: ResumePoint, owner: bool) -> tuple[int, str]:
    """Every rank's view of the verified local step: the owners' minimum, confirmed on each
    owner."""
    mine, said = _verified_step(save_dir, point, owner)
    step = collective_ints([mine], "min")[0]
    if step == _NO_OPINION:
        step = _NONE
    if step >= 0 and owner and mine != step:
        # Another node's newest intact tag is older than ours: it must be intact here too.
        status = commit.inspect(save_dir, tag_for_step(step))
        ok = status.complete and not commit.verify(save_dir, status)
    else:
        ok = True
    if step >= 0 and collective_ints([1 if ok else 0], "min")[0] == 0:
        raise CheckpointError(f"the nodes have no common intact checkpoint: global_step{step} is "
                              "the newest on one node and not intact on another; copy an intact "
                              "tag to every node")
    return step, said


def _remote_choice(url: str, run: RunConfig, local_step: int, local_run_id: str | None, *,
                   required: bool,
                   fresh_if_none: bool = False) -> tuple[str | None, str | None, str]:
    """On global rank 0: (the bucket tag to resume from, or None for the local one; its run id; a
    warning to log). `required`: the bucket is the only source (a URL was named, or nothing intact
    is local)."""

    try:
        backend = open_backend(url, credentials=run.credentials, start_up=not required)
        tag = remote_latest(backend)
        manifest = remote_manifest(backend, tag) if tag else None
    except StorageError as e:
        if required:
            raise
        return None, None, (f"could not look for a newer checkpoint in {url} ({e}); resuming from "
                            "the local one")
    run_id = manifest.get("run_id") if manifest else None
    if required:
        if tag is None and fresh_if_none:
            return None, None, (f"--resume auto: no checkpoint in {run.save_dir} nor under {url} "
                                f"yet: starting from step 0")
        if tag is None:
            raise CheckpointError(f"--resume: no COMPLETE checkpoint under {url} (a checkpoint "
                                  f"counts once its COMPLETE marker exists)")
        return tag, run_id, ""
    if tag is None or (step_of_tag(tag) or 0) <= local_step:
        return None, None, ""
    local = tag_for_step(local_step)
    if local_run_id and run_id and run_id != local_run_id:
        return None, None, (f"{url} holds a newer checkpoint ({tag}) of another run ({run_id}); "
                            f"resuming this run ({local_run_id}) from its local {local}")
    return tag, run_id, (f"{url} holds {tag}, newer than the local {local} in {run.save_dir}: "
                         f"resuming from the bucket's {tag}")


def finish_resume(plan, point: ResumePoint, data_tokens: int, *, topo, node_local: bool):
    """Phase 3, on every rank: returns (plan, tag to load or None, Identity) — the plan gains
    `load_universal` when the tag was converted."""

    run = plan.run
    save_dir = Path(run.save_dir)
    # the rank that holds (and downloads, converts) this node's copy
    owner = is_publishing_rank(topo, node_local)
    rank0 = topo.rank == 0
    step, said = _agree_local(save_dir, point, owner) if point.candidates else (_NONE, "")
    if step == _REFUSED:
        raise CheckpointError(
            said or f"the checkpoint {point.candidates[0]} is damaged on another node")
    warning = "; ".join(x for x in (point.note, said) if x)
    if warning and (rank0 or (owner and said)):
        log.warning("resume: %s", warning)
    if step == _NONE and point.candidates and not point.remote:
        raise CheckpointError(said or f"no intact checkpoint in {save_dir}")

    # The bucket, when it is the source or may hold something newer: rank 0 decides, every rank
    # follows.
    remote_tag = remote_id = None
    if point.remote and rank0:
        local_run_id = commit.inspect(save_dir, tag_for_step(step)).run_id if step >= 0 else None
        remote_tag, remote_id, told = _remote_choice(point.remote, run, step, local_run_id,
                                                     required=point.remote_only or step == _NONE,
                                                     fresh_if_none=point.fresh_if_none)
        if told:
            log.warning("resume: %s", told)
    chosen_remote = collective_ints([step_of_tag(remote_tag) if remote_tag else _NONE],
                                    "broadcast")[0]
    if chosen_remote >= 0:
        tag = tag_for_step(chosen_remote)
        newer = [t for t in commit.complete_tags(save_dir) if (step_of_tag(t) or 0) > chosen_remote]
        if newer and owner:
            raise CheckpointError(
                f"--resume {point.remote}: {save_dir} holds newer checkpoints ({_names(newer)}) "
                f"than the bucket's {tag}, which this run would write over; resume them with "
                "--resume latest, or give another --save-dir")
        if owner:
            fetch_remote_checkpoint(point.remote, run, tag)
            if point.remote == run.sync_to:
                # COMPLETE at the prefix this run publishes to, every byte checked against its
                # manifest: nothing to upload. Without this record the upload process would take
                # it for an unfinished upload and check it against the bucket again.
                journal_published(save_dir, folder_node(topo, node_local), tag)
        dist.barrier()
    else:
        tag = tag_for_step(step) if step >= 0 else None

    # The identity: the resumed checkpoint's run id (a fresh run draws one), a new session; rank 0's
    # on every rank.
    run_id = (commit.inspect(save_dir, tag).run_id or remote_id) if rank0 and tag else None
    ids = collective_ints([int(run_id if valid_id(run_id) else new_id(), 16), int(new_id(), 16)],
                          "broadcast")
    identity = Identity(f"{ids[0]:012x}", f"{ids[1]:012x}")
    if not tag:
        return plan, None, identity
    check_resume(plan, tag, data_tokens)
    saved = train_state.read_saved_meta(save_dir, tag)
    change = (train_state.partitioning_change(saved, ds_config=plan.ds_config, dp_size=plan.dp_size)
              if saved else None)
    if change is None:
        return plan, tag, identity
    universal = tag + UNIVERSAL_SUFFIX
    if owner:
        log.info("resume: %s; converting %s to a DeepSpeed universal checkpoint (%s)", change, tag,
                 universal)
        to_universal(save_dir, tag)
    dist.barrier()
    ds_config = {**plan.ds_config,
                 "checkpoint": {**plan.ds_config.get("checkpoint", {}), "load_universal": True}}
    return dataclasses.replace(plan, ds_config=ds_config), universal, identity


def to_universal(save_dir: Path, tag: str) -> Path:
    """`python -m deepspeed.checkpoint.ds_to_universal` on save_dir/tag -> save_dir/tag_universal
    (DeepSpeed's own tool; a separate process so its worker pool and memory go away with it). A
    finished conversion is reused."""
    src, out = save_dir / tag, save_dir / (tag + UNIVERSAL_SUFFIX)
    done = out / ".neox-universal-complete"
    if done.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # a half-written conversion from a crash
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(out), "--inject_missing_state",
           "--num_extract_workers", str(min(4, os.cpu_count() or 1)),
           "--num_merge_workers", str(min(2, os.cpu_count() or 1))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"converting {src} to a universal checkpoint failed ({last}); the "
                          f"original checkpoint is untouched")
    done.write_text(tag + "\n")
    log.info("resume: universal checkpoint %s written in %.1f s", out,
             time.perf_counter() - started)
    return out


def after_resume_load(plan, tag: str | None, *, topo, node_local: bool) -> None:
    """Once every rank has loaded a converted copy it is dead weight (the next save is a normal tag
    at the new size); a crash before that save simply converts again."""
    if not (tag and tag.endswith(UNIVERSAL_SUFFIX)):
        return

    dist.barrier()
    if is_publishing_rank(topo, node_local):
        save_dir = Path(plan.run.save_dir)
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        (save_dir / "latest_universal").unlink(missing_ok=True)
