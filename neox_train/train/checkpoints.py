"""The trainer's checkpoints: start a save, commit it once every rank's files are durable, hand it
to the upload worker, keep the last N, and the preemption budget. The loop (trainer.py) decides
when; this decides how.

Metrics (`checkpoint/*`, when a save is committed):
- stall_s: the seconds the loop was blocked by this save (snapshot or write, the commit, the wait
  for the previous);
- write_s: the slowest rank's writing;
- gb_per_s: all ranks' bytes over write_s;
- in_flight_wait_s: the part of stall_s spent waiting for the previous save.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local import commit, train_state
from neox_train.checkpoint.local.checkpoint_engine import install
from neox_train.checkpoint.local.saver import Saver, SaveResult, choose_async
from neox_train.checkpoint.local.tags import step_of_tag, tag_for_step
from neox_train.checkpoint.publish.publisher import Publisher
from neox_train.checkpoint.publish.settings import (
    folder_node,
    is_publishing_rank,
    node_local_storage,
)
from neox_train.distributed import Control, Topology
from neox_train.ds_config import checkpoint_bytes, precision, snapshot_bytes_per_node, zero_stage
from neox_train.log import log
from neox_train.model import parameter_counts
from neox_train.train.metrics import Metrics
from neox_train.train.plan import RunPlan
from neox_train.units import human_bytes

# Seconds of the preemption budget kept back for exiting (closing the worker, the summary, the
# process teardown).
EXIT_RESERVE_S = 2.0


class Checkpoints:
    def __init__(self, engine, plan: RunPlan, *, topo: Topology, publisher: Publisher,
                 metrics: Metrics, control: Control, on_gpu: bool, data_tokens: int):
        self.plan = plan
        self.engine = engine
        self.save_dir = Path(plan.run.save_dir)
        self.publisher = publisher
        self.is_rank0 = topo.rank == 0
        self.metrics = metrics
        self.control = control
        self.data_tokens = data_tokens
        # The rank that owns this node's checkpoint folder: it commits each tag, uploads it and
        # deletes old ones (each node's own files with node-local storage), so deletion can wait
        # until it has seen them verified remote.
        node_local = node_local_storage(plan.ds_config)
        self.folder_owner = is_publishing_rank(topo, node_local)
        params = parameter_counts(plan.model_config).total
        ds = plan.ds_config
        # Until the first save has a real size: DeepSpeed's layout by parameter count, precision and
        # stage.
        self.checkpoint_bytes = checkpoint_bytes(params, precision(ds), zero_stage(ds))
        self.snapshot_bytes = snapshot_bytes_per_node(params, precision(ds), zero_stage(ds),
                                                      num_nodes=topo.num_nodes,
                                                      world_size=plan.dp_size)
        asynchronous = choose_async(plan.run.async_save, self.snapshot_bytes)
        # One mode for every rank: the commit's collectives come at the same point only when all
        # save alike.
        if control.sum([int(not asynchronous)])[0] and asynchronous:
            asynchronous = False
            log.warning("checkpoints are saved synchronously: another node has too little host "
                        "memory for the asynchronous save's snapshot (see its WARNING)")
        self.saver = Saver(engine, install(engine, pin_memory=on_gpu), self.save_dir,
                           owner=self.folder_owner, run_id=publisher.identity.run_id,
                           control=control, asynchronous=asynchronous,
                           disk=folder_node(topo, node_local))
        self.last_tag: str | None = None
        self.committed_at = 0.0  # time.monotonic() of the newest local commit
        self.save_started_at = 0.0  # time.monotonic() when the newest save began

    # -- saves -------------------------------------------------------------------------------------
    def save(self, step: int, consumed_samples: int, losses: dict[str, Any], *,
             guard: dict[str, Any] | None = None, asynchronous: bool | None = None,
             first: bool = False) -> float:
        """Save `step` (every rank); returns the seconds the loop was blocked. A synchronous save
        (or `asynchronous=False`) is committed before this returns; an asynchronous one at a later
        step (`poll`)."""
        started = time.perf_counter()
        self.save_started_at = time.monotonic()
        tag = tag_for_step(step)
        if self.folder_owner:
            # The room left is what the save in flight leaves: wait for its files first (a check
            # while they are being written sees space they are about to take).
            self.saver.wait_written()
            warning = train_state.space_warning(self.save_dir, tag, self.checkpoint_bytes)
            if warning:
                warning = self.make_room(tag)
            if warning:
                log.warning("%s", warning)
        plan = self.plan
        state = train_state.TrainState(step, consumed_samples, guard=guard)
        extra = train_state.client_state(
            state=state, run_config=plan.run.to_dict(), ds_config=plan.ds_config,
            model_config=plan.model_config.to_dict(), dp_size=plan.dp_size,
            data_tokens=self.data_tokens,
        )
        self.publisher.hold_uploads(True)
        previous = self.saver.begin(step, extra, losses=losses,
                                    expected_bytes=self.checkpoint_bytes, asynchronous=asynchronous)
        if previous is not None:
            self._committed(previous)
        if not self.saver.ckpt.asynchronous:
            self._committed(self.saver.finish(), first=first)
        return time.perf_counter() - started

    def poll(self, writing: int) -> float:
        """After the per-step agreement (`writing`: ranks still writing): commit a finished save;
        the seconds spent."""
        if not self.saver.in_flight or writing:
            return 0.0
        started = time.perf_counter()
        self._committed(self.saver.finish())
        return time.perf_counter() - started

    def drain(self) -> float:
        """Wait for the save in flight and commit it (the end of training, a stop)."""
        if not self.saver.in_flight:
            return 0.0
        started = time.perf_counter()
        self._committed(self.saver.wait_and_finish())
        return time.perf_counter() - started

    def load_newest_before(self, step: int) -> tuple[str, train_state.TrainState] | None:
        """The loss guard's rollback, on every rank: the save in flight committed, then the newest
        complete tag before `step` that every node holds (node-local folders differ) loaded into the
        engine; None when none."""
        self.drain()
        mine = [step_of_tag(t) for t in commit.complete_tags(self.save_dir)]
        newest = max((s for s in mine if s is not None and s < step), default=-1)
        target = min(int(v) for v in self.control.gather(newest))
        if target < 0:
            return None
        tag = tag_for_step(target)
        return tag, train_state.load(self.engine, self.save_dir, tag)

    def _committed(self, result: SaveResult, *, first: bool = False) -> None:
        if not self.saver.in_flight:
            self.publisher.hold_uploads(False)
        if result.status is not None and result.status.files:
            self.checkpoint_bytes = sum(f.size for f in result.status.files.values())
        handed = time.perf_counter()
        self.publisher.committed(result.tag, first=first)
        values = {**result.metrics(), "submit_s": time.perf_counter() - handed}
        # at the saved step, whenever committed
        self.metrics.record(step_of_tag(result.tag), "checkpoint", values)
        mode = "asynchronously" if result.asynchronous else "synchronously"
        log.info("saved checkpoint %s %s: the loop waited %.2f s (previous save %.2f s), writing "
                 "took %.2f s (%s at %.2f GB/s)", self.save_dir / result.tag, mode, result.stall_s,
                 result.in_flight_wait_s, result.write_s, human_bytes(result.bytes_written),
                 result.gb_per_s)
        self.last_tag = result.tag
        self.committed_at = time.monotonic()
        self.apply_retention()

    # -- retention, uploads ------------------------------------------------------------------------
    def apply_retention(self) -> None:
        if not self.folder_owner:
            return
        deleted = train_state.apply_retention(self.save_dir, self.plan.run.keep_last_n,
                                             may_delete=self.publisher.may_delete)
        if deleted:
            log.info("removed local checkpoint(s) %s (keep_last_n=%d)", ", ".join(deleted),
                     self.plan.run.keep_last_n)

    def make_room(self, tag: str) -> str:
        """Before a save that will not fit: retention first (keep_last_n, as after every save), then
        local tags verified in the bucket, oldest first, never the newest complete one nor the one
        `latest` names; each removal is said. Returns the space warning still standing ("" once the
        save fits)."""
        self.apply_retention()
        warning = train_state.space_warning(self.save_dir, tag, self.checkpoint_bytes)
        if not warning or self.plan.run.sync_to is None:
            return warning
        complete = commit.complete_tags(self.save_dir)
        latest, _ = commit.read_latest(self.save_dir)
        verified = set(self.publisher.verified_now())
        removed = []
        for old in complete[:-1]:
            if not warning:
                break
            if old == latest or old not in verified:
                continue
            train_state.remove_tag(self.save_dir, old)
            removed.append(old)
            warning = train_state.space_warning(self.save_dir, tag, self.checkpoint_bytes)
        if removed:
            log.warning("removed local checkpoint(s) %s to make room for %s: each is verified in "
                        "%s (%s free now)",
                        ", ".join(removed), tag, self.plan.run.sync_to,
                        human_bytes(train_state.free_bytes(self.save_dir)))
        return warning

    def too_many_unpublished(self) -> bool:
        """After a save, on every rank: are more than max_unpublished_checkpoints checkpoints kept
        locally because publishing fails? Only the publishing ranks know; one sum over the control
        group makes every rank stop at the same step."""
        limit = self.plan.run.max_unpublished_checkpoints
        if not limit or self.plan.run.sync_to is None:
            return False
        stuck = self.publisher.enabled and len(self.publisher.poll().stuck) > limit
        return self.control.sum([int(stuck)])[0] > 0

    def flush_at_exit(self, step: int, summary: dict[str, Any], *,
                      signal_at: Callable[[], float | None],
                      signal_name: Callable[[], str]) -> None:
        """The end-of-run flush into summary["sync"]. Bounded: by the preemption budget after a stop
        signal, even one that arrives during the flush (`signal_at`: when the first came, None
        before); to a short flush when nothing gets published."""
        run = self.plan.run
        timeout = min(60.0, run.upload_timeout_s) if summary.get("stopped_unpublished") else None
        preempted = summary.get("stopped_by_signal") and signal_at() is not None
        if preempted:
            timeout = self.upload_budget(signal_at())

        def cutoff() -> float | None:
            at = signal_at()
            return None if at is None else time.monotonic() + self.upload_budget(at)

        summary["sync"] = self.finish_uploads(step, timeout_s=timeout, cutoff=cutoff)
        if signal_at() is not None and not preempted:  # the signal came during the flush
            summary["stopped_by_signal"] = signal_name()
        if preempted and self.is_rank0:
            summary["preemption"] = self.preemption_summary(signal_at(), summary["sync"])

    def finish_uploads(self, step: int, *, timeout_s: float | None = None,
                       cutoff: Callable[[], float | None] | None = None) -> dict[str, Any] | None:
        """Flush pending uploads (bounded, and by `cutoff`: a monotonic time the flush must end by,
        looked at while it waits), then retention for what became verified remote; report what is
        left."""
        if not self.publisher.enabled:
            return None
        status = self.publisher.close(timeout_s, cutoff=cutoff)
        self.metrics.record(step, "sync", self.publisher.metrics())
        self.apply_retention()
        return {"published": status.published, "unpublished": status.unpublished,
                "stuck": status.stuck, "skipped": status.skipped, "handed": status.handed,
                "failed": status.failed, "failures": status.failures,
                "last_error": status.last_error}

    def preemption_summary(self, signal_at: float, sync: dict[str, Any] | None) -> dict[str, Any]:
        """What fit in the grace period after SIGTERM: saved locally, published, seconds used."""
        used = time.monotonic() - signal_at
        tag = self.last_tag
        saved = tag is not None and (
            not self.folder_owner or commit.inspect(self.save_dir, tag).complete)
        published = (None if self.plan.run.sync_to is None
                     else bool(sync and tag in sync["published"]))
        out = {"tag": tag, "saved_locally": saved, "published": published,
               "seconds_used": round(used, 2),
               "saved_after_s": round(self.committed_at - signal_at, 2) if saved else None,
               "budget_s": self.plan.run.preemption_grace_s,
               "phases_s": self.preemption_phases(signal_at, tag if saved else None)}

        def yes(v: bool | None) -> str:
            return "n/a (no --sync-to)" if v is None else ("yes" if v else "no")

        phases = ", ".join(f"{k} {v:.1f} s" for k, v in out["phases_s"].items())
        log.warning("preemption: %s saved locally: %s, published: %s, %.1f s of the %.0f s grace "
                    "period used%s",
                    tag or "nothing", yes(saved), yes(published), used,
                    self.plan.run.preemption_grace_s, f" ({phases})" if phases else "")
        return out

    def preemption_phases(self, signal_at: float, tag: str | None) -> dict[str, float]:
        """Where the grace period went, in order: stop (signal to the save's start: the step in
        progress ends), local_save (to the local commit), upload (this node's files, as the upload
        process timed them), publish (manifest, COMPLETE, latest). Phases that did not happen are
        left out."""
        if tag is None:
            return {}
        phases = {}
        if self.save_started_at >= signal_at:  # else the tag is a save from before the signal
            phases.update(stop=self.save_started_at - signal_at,
                          local_save=self.committed_at - self.save_started_at)
        timings = self.publisher.poll().timings.get(tag) if self.publisher.enabled else None
        if timings:
            phases.update(upload=timings["upload_s"], publish=timings["publish_s"])
        return {k: round(v, 2) for k, v in phases.items()}

    def upload_budget(self, signal_at: float) -> float:
        """Seconds left for uploading after a preemption save."""
        left = self.plan.run.preemption_grace_s - (time.monotonic() - signal_at) - EXIT_RESERVE_S
        return max(0.0, min(left, self.plan.run.upload_timeout_s))
