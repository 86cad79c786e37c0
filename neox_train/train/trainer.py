"""The training loop on the DeepSpeed engine.

`Trainer` builds the engine (from a plan that train.plan has already checked) and runs the loop.
DeepSpeed owns gradient accumulation, clipping, the LR schedule, mixed precision and ZeRO; the loop
only feeds micro-batches and decides when to log, evaluate and save.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from neox_train.checkpoint.local import train_state
from neox_train.checkpoint.publish.publisher import Publisher
from neox_train.data.loader import MicroBatchLoader
from neox_train.data.mixture import MixtureSplit, MixtureWindows, make_stream
from neox_train.data.windows import PackedWindows, Split
from neox_train.distributed import Control, Topology
from neox_train.ds_config import precision, zero_stage
from neox_train.lm_loss import documents, window_loss
from neox_train.log import log
from neox_train.train import reporting
from neox_train.train.checkpoints import Checkpoints
from neox_train.train.evaluation import evaluate_split
from neox_train.train.faults import Faults
from neox_train.train.guard import LossGuard, StepOutcome, UpdateSwitch, roll_back
from neox_train.train.metrics import Metrics, Throughput
from neox_train.train.perf import StepTimer, as_float
from neox_train.train.plan import RunPlan
from neox_train.train.profiling import Profiling
from neox_train.train.training_engine import build_engine
from neox_train.train.watchdog import HangLimits, Watchdog


class Trainer:
    def __init__(
        self, plan: RunPlan, data: tuple[PackedWindows | MixtureWindows, Split | MixtureSplit], *,
        resume_tag: str | None, topo: Topology,
        publisher: Publisher, watchdog: Watchdog | None = None,
    ):
        """Build the engine and load `resume_tag` (verified by finish_resume). The run's identity
        comes with the publisher (it is the same whether or not anything is synced). `watchdog`: the
        rank's hang watchdog, armed since the process started (None: an unarmed one, for benchmarks
        that build a Trainer themselves)."""

        self.plan = plan
        run = plan.run
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_rank0 = self.rank == 0
        self.save_dir = Path(run.save_dir)
        self.windows, self.split = data
        # before the engine: a memory snapshot's history starts with the model's allocations
        self.profiling = Profiling(run, rank=self.rank, cuda=torch.cuda.is_available())

        self.engine, self._hf_ds_config = build_engine(plan, resume_tag=resume_tag)
        self._documents = documents(plan, self.engine.module)  # document masking's inputs
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()

        state = train_state.TrainState(step=0, consumed_samples=0)
        if resume_tag:
            tag = resume_tag
            state = train_state.load(self.engine, self.save_dir, tag)
            log.info("resumed from %s: step %d, %d samples consumed", self.save_dir / tag,
                     state.step, state.consumed_samples)
        self.step = state.step
        self.watchdog = watchdog or Watchdog(HangLimits.from_run(run), rank=self.rank)
        self.watchdog.started_at_step(state.step)
        self.guard = LossGuard(run)
        self.guard.load_state_dict(state.guard)
        self.switch = UpdateSwitch(self.engine)
        self.switch.active = self.guard.enabled
        self.faults = Faults(self.rank)
        self.outcome = StepOutcome()
        self.device = torch.device(self.engine.device)
        stream = make_stream(self.split, seed=run.seed, micro_batch=self.micro_batch,
                             dp_rank=self.rank, dp_size=plan.dp_size,
                             consumed_samples=state.consumed_samples)
        self.loader = MicroBatchLoader(self.windows, stream, device=self.device,
                                       prefetch=run.prefetch_micro_batches)
        self.timer = StepTimer(self.device)
        self.flops = reporting.flops_accounting(plan, self.device)
        self.metrics = Metrics.for_run(plan, publisher.identity.run_id, enabled=self.is_rank0,
                                       start_step=state.step)
        self.tokens_per_step = plan.ds_config["train_batch_size"] * run.seq_len
        self.last_saved_step = state.step if resume_tag else -1
        self.topo = topo
        self.publisher = publisher
        # Once a step, before its update, the ranks agree on a CPU group (no device tensor in the
        # collective).
        try:
            self.control = Control(plan.dp_size, timeout_s=self.watchdog.limits.collective_s)
            self.checkpoints = Checkpoints(self.engine, plan, topo=topo, publisher=publisher,
                                           metrics=self.metrics, control=self.control,
                                           on_gpu=self.device.type == "cuda",
                                           data_tokens=self.windows.num_tokens)
        except BaseException:
            self.metrics.close(failed=True)  # its tracker runs: no close() follows a failed init
            raise
        self.stop_requested = False
        # when the first SIGTERM arrived (the preemption budget starts)
        self.stop_signal_at: float | None = None
        # which signal asked for the stop (Ctrl-C's SIGINT behaves the same)
        self.stop_signal = "SIGTERM"
        # the newest logged train / validation loss, for run.json
        self.last_losses: dict[str, float | int] = {}
        self.tracker_counts: dict[str, dict] = {}  # per tracker: points sent, dropped, skipped
        self._announced = False  # the "training ..." line, once even when train() runs in slices
        # this step's agreement: (stop, ranks still writing a save)
        self._agreed: tuple[bool, int] = (False, 0)
        self._saved_since_agreement = False  # a save began after it (a rollback's, a scheduled one)
        self._save_deferred = False  # a save fell on a bad step: it happens at the next good one


    # -- one optimizer step ------------------------------------------------------------------------
    def _tensor(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.windows.batch(indices)).to(
            self.engine.device, non_blocking=True)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return window_loss(self.engine, batch, chunk=self.plan.run.loss_chunk, **self._documents)

    def train_step(self, *, want_grad_norm: bool = False) -> tuple[torch.Tensor, float | None]:
        """grad_accum micro-steps; DeepSpeed steps the optimizer on the last.

        Returns the mean loss (a device tensor: no host sync here) and, when asked, the pre-clipping
        gradient norm. The time of each phase goes to self.timer (see perf.StepTimer: no host-device
        sync per micro-step).
        """
        total = torch.zeros((), device=self.engine.device)
        grad_norm = None
        timer = self.timer
        factor = None
        if self.faults:  # the testing aid (train.faults): inert unless NEOX_FAULT is set
            self.faults.before_step(self.step + 1)
            factor = self.faults.loss_factor(self.step + 1)
        for micro in range(self.grad_accum):
            waited = time.perf_counter()
            batch = self.loader.next()
            timer.add_host("data_wait", time.perf_counter() - waited)
            started = timer.begin()
            loss = self._loss(batch)
            if factor is not None:
                loss = loss * factor
            self.engine.backward(loss)
            timer.end("fwd_bwd", started)
            total += loss.detach()
            started = timer.begin()
            last = micro == self.grad_accum - 1
            if last:
                # Before DeepSpeed applies the update: every rank agrees on the step (and the guard
                # judges it).
                self._agree(total)
            if want_grad_norm and last and self._own_grad_norm:
                grad_norm = self._full_grad_norm()
            # On the accumulation boundary this is the optimizer step (with ZeRO, also the gradient
            # reduction that did not overlap backward); on the other micro-steps DeepSpeed's
            # bookkeeping only.
            self.engine.step()
            timer.end("optimizer", started)
        self._judged()
        if want_grad_norm and grad_norm is None:
            grad_norm = as_float(self.engine.get_global_grad_norm())
        return total / self.grad_accum, grad_norm

    def _agree(self, total: torch.Tensor) -> None:
        """At the accumulation boundary, on every rank: one float64 sum over the gloo control group
        (nothing at all with one rank) of (a SIGTERM reached this rank, this rank still writes a
        save, with the guard: this rank's loss of the step). The loss costs one host-device sync;
        the guard's verdict decides the update."""
        values = [float(self.stop_requested), float(self.checkpoints.saver.writing())]
        if self.guard.enabled:
            values.append(total.item() / self.grad_accum)
        out = self.control.sum_floats(values)
        self._agreed = (out[0] > 0, int(out[1]))
        self._saved_since_agreement = False
        if self.guard.enabled:
            loss = out[2] / self.plan.dp_size
            verdict = self.guard.judge(loss)
            self.switch.skip, self.switch.reason = verdict.bad, verdict.reason
            self.outcome = StepOutcome(loss)

    def _judged(self) -> None:
        """After the optimizer step: was the update applied? (The guard skipped it, or DeepSpeed
        did: a non-finite gradient norm.)"""
        if not self.guard.enabled:
            return
        skipped, reason = self.switch.skip, self.switch.reason
        if not skipped and not self.engine.was_step_applied():
            skipped, reason = True, "non-finite gradient norm (DeepSpeed skipped the update)"
        self.switch.skip, self.switch.reason = False, ""
        self.outcome.skipped, self.outcome.reason = skipped, reason

    @property
    def _own_grad_norm(self) -> bool:
        # DeepSpeed reports the global norm from its ZeRO and bf16/fp16 optimizers; plain fp32
        # ZeRO-0 clips with torch and keeps no norm. There the gradients are whole and already
        # all-reduced after the last backward.
        return zero_stage(self.plan.ds_config) == 0 and precision(self.plan.ds_config) == "fp32"

    def _full_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads).item()) if grads else float("nan")

    def evaluate(self) -> dict[str, float]:
        return evaluate_split(self.engine, lambda indices: self._loss(self._tensor(indices)),
                              self.split, micro_batch=self.micro_batch, dp_size=self.plan.dp_size,
                              rank=self.rank, max_batches=self.plan.run.eval_batches)

    # -- the loop ----------------------------------------------------------------------------------
    def request_stop(self, signal_name: str = "SIGTERM") -> None:
        """The SIGTERM (and first Ctrl-C) handler: stop at the end of this step, on every rank (the
        per-step agreement); during the end-of-run flush, cut the flush to the preemption budget."""
        self.stop_requested = True
        if self.stop_signal_at is None:
            self.stop_signal_at = time.monotonic()
            self.stop_signal = signal_name

    def save(self, *, asynchronous: bool | None = None, first: bool = False) -> float:
        """Save this step; returns the seconds the loop was blocked (see train.checkpoints)."""
        self.last_saved_step = self.step
        self._saved_since_agreement = True
        with self.watchdog.phase("save"):
            return self.checkpoints.save(self.step, self.loader.consumed_samples, self.last_losses,
                                         guard=self.guard.state_dict(), asynchronous=asynchronous,
                                         first=first)

    def _roll_back(self) -> None:
        """After max_bad_steps bad steps in a row (see train.guard.roll_back); then that state is
        saved, so a resume sees what this run sees."""
        with self.watchdog.phase("rollback"):
            roll_back(self.guard, step=self.step, reason=self.outcome.reason,
                      checkpoints=self.checkpoints, consumed_samples=self.loader.consumed_samples,
                      metrics=self.metrics)
        self._save_deferred = False
        self.save()

    def train(self, *, until_step: int | None = None, final: bool = True) -> dict[str, Any]:
        """Train to max_steps (or to `until_step`, for benchmarks that run the loop in slices).

        `final`: save the last step, flush uploads and close the loader and metrics at the end."""

        run = self.plan.run
        end = run.max_steps if until_step is None else min(until_step, run.max_steps)
        if not self._announced:
            self._announced = True
            reporting.announce(self.plan, step=self.step, micro_batch=self.micro_batch,
                               grad_accum=self.grad_accum, tokens_per_step=self.tokens_per_step)
        bar = tqdm(total=run.max_steps, initial=self.step, disable=not self.is_rank0, desc="train",
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        self.timer.reset()
        throughput = Throughput(self.tokens_per_step, self.timer)
        loss_sum = torch.zeros((), device=self.engine.device)
        loss_count = 0
        summary: dict[str, Any] = {"start_step": self.step}
        loop_started, steps_run = time.perf_counter(), 0
        # log lines above the bar, not glued onto it
        redirect = logging_redirect_tqdm(loggers=[log])
        redirect.__enter__()
        try:
            while self.step < end:
                log_now = (self.step + 1) % run.log_steps == 0 or self.step + 1 == run.max_steps
                # the rate this step uses (the scheduler moves in step())
                lr = float(self.engine.get_lr()[0])
                loss, grad_norm = self._profiled_step(want_grad_norm=log_now)
                self.step += 1
                self.profiling.after_step(self.step)
                steps_run += 1
                self.watchdog.beat(self.step)
                throughput.step()
                bar.update(1)
                if self._after_update(throughput):
                    loss_sum += loss
                    loss_count += 1
                if log_now:
                    values = {
                        "loss": (reporting.global_mean(loss_sum / loss_count, self.plan.dp_size)
                                 if loss_count else float("nan")),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "consumed_samples": self.loader.consumed_samples,
                        **reporting.perf_values(throughput.read_and_reset(), self.flops,
                                                self.device),
                    }
                    loss_sum.zero_()
                    loss_count = 0
                    reporting.logged_step(self.step, values, metrics=self.metrics, bar=bar,
                                          summary=summary, last_losses=self.last_losses)
                if run.eval_steps and self.step % run.eval_steps == 0 and len(self.split.val):
                    with self.watchdog.phase("eval"):
                        ev = self.evaluate()
                    if ev:
                        reporting.evaluation(self.step, ev, metrics=self.metrics,
                                             summary=summary, last_losses=self.last_losses)
                    throughput.restart()
                if log_now:
                    reporting.sync_status(self.step, self.publisher, self.metrics)
                if self._save_if_due(throughput) and self.checkpoints.too_many_unpublished():
                    summary["stopped_unpublished"] = True
                    break
                stop, writing = self._agreed
                # `writing` counted the ranks before that save began
                if not self._saved_since_agreement:
                    throughput.add_checkpoint_stall(self.checkpoints.poll(writing))
                if stop:
                    log.warning("stop requested (%s) at step %d: saving and flushing uploads",
                                self.stop_signal if self.stop_requested
                                else "a signal on another rank", self.step)
                    summary["stopped_by_signal"] = self.stop_signal
                    break
            # The run's own rate: every step this process trained over the loop's wall time, saves
            # and evaluations included (the log lines' rate is the last window's, without them).
            summary["tokens_per_s"] = reporting.run_rate(
                steps_run, self.tokens_per_step, time.perf_counter() - loop_started)
            if final:
                self._final_save(summary)
        except BaseException:
            if final:
                self.close(failed=True)
            raise
        finally:
            bar.close()
            redirect.__exit__(None, None, None)
        if final:
            try:
                # Only once the training bar is closed: the flush logs and draws a bar of its own.
                # It is bounded by its own timeouts, so the watchdog stands down.
                self.watchdog.disarm()
                self.checkpoints.flush_at_exit(self.step, summary,
                                               signal_at=lambda: self.stop_signal_at,
                                               signal_name=lambda: self.stop_signal)
            finally:
                self.close()
        summary["end_step"] = self.step
        summary["trackers"] = self.tracker_counts
        return summary

    def _profiled_step(self, *, want_grad_norm: bool) -> tuple[torch.Tensor, float | None]:
        """train_step, with --profile-steps and --memory-snapshot around it."""
        self.profiling.before_step(self.step + 1)
        try:
            return self.train_step(want_grad_norm=want_grad_norm)
        except torch.OutOfMemoryError:
            self.profiling.out_of_memory(self.step + 1)
            raise

    def _after_update(self, throughput: Throughput) -> bool:
        """The guard's bookkeeping of the step just taken (a rollback when a streak calls for it);
        True when the step's loss counts in the logged mean (its update was applied)."""
        outcome = self.outcome
        roll_back = self.guard.enabled and self.guard.record(
            self.step, outcome.loss, outcome.skipped)
        if outcome.skipped:
            reporting.skipped_update(self.step, outcome, self.guard, self.metrics)
        if roll_back:
            self._roll_back()
            throughput.restart()
        return not outcome.skipped

    def _save_if_due(self, throughput: Throughput) -> bool:
        """Save when save_steps says so, except within a streak of bad steps (then at the first good
        step, so the newest checkpoint stays the one a rollback returns to). True when a save
        began."""
        due = self.step % self.plan.run.save_steps == 0 or self._save_deferred
        if not due or self.last_saved_step == self.step:
            return False
        if self.guard.streak:
            self._save_deferred = True
            return False
        self._save_deferred = False
        throughput.add_checkpoint_stall(self.save())
        throughput.restart()
        return True

    def _final_save(self, summary: dict[str, Any]) -> None:
        """The save in flight committed, then this step saved unless it is (or publishing is
        stuck)."""
        with self.watchdog.phase("save"):
            self.checkpoints.drain()
        if self.last_saved_step != self.step and not summary.get("stopped_unpublished"):
            # The loop is over: nothing to overlap with, so no snapshot; a preemption save goes
            # first in line.
            self.save(asynchronous=False, first=summary.get("stopped_by_signal", False))

    def close(self, *, failed: bool = False) -> None:
        self.profiling.close(self.step)
        self.loader.close()
        # after a stop signal the trackers get what is left of the preemption budget
        left = (None if self.stop_signal_at is None
                else self.checkpoints.upload_budget(self.stop_signal_at))
        self.tracker_counts.update(self.metrics.close(failed=failed, timeout_s=left))
