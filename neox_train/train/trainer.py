"""The training loop on the DeepSpeed engine.

`Trainer` builds the engine (from a plan that train.plan has already checked) and runs the loop. DeepSpeed owns
gradient accumulation, clipping, the LR schedule, mixed precision and ZeRO; the loop only feeds micro-batches and
decides when to log, evaluate and save.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from neox_train.checkpoint import state as checkpoint
from neox_train.checkpoint.publisher import (
    Publisher,
    is_uploader,
    node_local_storage,
)
from neox_train.data.loader import MicroBatchLoader
from neox_train.data.windows import PackedWindows, SampleStream, Split, eval_batches
from neox_train.distributed import Topology
from neox_train.ds_config import checkpoint_bytes, precision, zero_stage
from neox_train.log import log
from neox_train.model import (
    flops_per_token,
    parameter_counts,
)
from neox_train.train.engine import build_engine
from neox_train.train.metrics import Metrics, Throughput
from neox_train.train.perf import (
    FlopsAccounting,
    StepTimer,
    as_float,
    device_name,
    memory_high_water,
    perf_text,
    resolve_peak,
)
from neox_train.train.plan import RunPlan

# How often ranks agree on a pending SIGTERM (one tiny all-reduce): rare enough to cost nothing, soon enough to
# save well inside a scheduler's grace period.
STOP_CHECK_STEPS = 10


class Trainer:
    def __init__(
        self, plan: RunPlan, data: tuple[PackedWindows, Split], *, resume_tag: str | None, topo: Topology,
        publisher: Publisher,
    ):
        """Build the engine and load `resume_tag` (verified by resume.finish). The run's identity comes with the
        publisher (it is the same whether or not anything is synced)."""

        self.plan = plan
        run = plan.run
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_rank0 = self.rank == 0
        self.save_dir = Path(run.save_dir)
        self.windows, self.split = data

        self.engine, self._hf_ds_config = build_engine(plan, resume_tag=resume_tag)
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()

        state = checkpoint.TrainState(step=0, consumed_samples=0)
        if resume_tag:
            tag = resume_tag
            state = checkpoint.load(self.engine, self.save_dir, tag)
            log.info("resumed from %s: step %d, %d samples consumed", self.save_dir / tag, state.step,
                     state.consumed_samples)
        self.step = state.step
        self.device = torch.device(self.engine.device)
        stream = SampleStream(
            self.split.train, seed=run.seed, micro_batch=self.micro_batch,
            dp_rank=self.rank, dp_size=plan.dp_size, consumed_samples=state.consumed_samples,
        )
        self.loader = MicroBatchLoader(self.windows, stream, device=self.device, prefetch=run.prefetch_micro_batches)
        self.timer = StepTimer(self.device)
        peak = resolve_peak(device_name(self.device), precision(plan.ds_config), run.peak_tflops)
        self.flops = FlopsAccounting(
            model_flops_per_token=flops_per_token(plan.model_config, run.seq_len),
            hardware_flops_per_token=flops_per_token(
                plan.model_config, run.seq_len, activation_checkpointing=run.activation_checkpointing
            ),
            num_devices=plan.dp_size,
            peak=peak,
        )
        log.info("MFU %s", f"against {peak.source}" if peak.tflops else f"not reported: {peak.source}")
        self.metrics = Metrics(Path(run.log_dir), enabled=self.is_rank0, start_step=state.step)
        self.tokens_per_step = plan.ds_config["train_batch_size"] * run.seq_len
        self.last_saved_step = state.step if resume_tag else -1
        self.topo = topo
        self.publisher = publisher
        # The rank that owns this node's checkpoint folder: it commits each tag, uploads it and deletes old ones
        # (each node's own files with node-local storage), so deletion can wait until it has seen them verified
        # remote.
        self.folder_owner = is_uploader(topo, node_local_storage(plan.ds_config))
        counts = parameter_counts(plan.model_config)
        # Until the first save has a real size: DeepSpeed's layout by parameter count, precision and stage.
        self.checkpoint_bytes = checkpoint_bytes(counts.total, precision(plan.ds_config), zero_stage(plan.ds_config))
        self.stop_requested = False
        self.last_losses: dict[str, float | int] = {}  # the newest logged train / validation loss, for run.json
        self._announced = False  # the "training ..." line, once even when train() runs in slices

    # -- one optimizer step -------------------------------------------------------------------------------------
    def _tensor(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.windows.batch(indices)).to(self.engine.device, non_blocking=True)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.engine(input_ids=batch[:, :-1]).logits
        # fp32 cross-entropy: bf16 log-softmax over 50k classes loses the small differences that make the loss.
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))

    def train_step(self, *, want_grad_norm: bool = False) -> tuple[torch.Tensor, float | None]:
        """grad_accum micro-steps; DeepSpeed steps the optimizer on the last.

        Returns the mean loss (a device tensor: no host sync here) and, when asked, the pre-clipping gradient norm.
        The time of each phase goes to self.timer (see perf.StepTimer: no host-device sync per micro-step).
        """
        total = torch.zeros((), device=self.engine.device)
        grad_norm = None
        timer = self.timer
        for micro in range(self.grad_accum):
            waited = time.perf_counter()
            batch = self.loader.next()
            timer.add_host("data_wait", time.perf_counter() - waited)
            started = timer.begin()
            loss = self._loss(batch)
            self.engine.backward(loss)
            timer.end("fwd_bwd", started)
            started = timer.begin()
            if want_grad_norm and micro == self.grad_accum - 1 and self._own_grad_norm:
                grad_norm = self._full_grad_norm()
            # On the accumulation boundary this is the optimizer step (with ZeRO, also the gradient reduction
            # that did not overlap backward); on the other micro-steps DeepSpeed's bookkeeping only.
            self.engine.step()
            timer.end("optimizer", started)
            total += loss.detach()
        if want_grad_norm and grad_norm is None:
            grad_norm = as_float(self.engine.get_global_grad_norm())
        return total / self.grad_accum, grad_norm

    @property
    def _own_grad_norm(self) -> bool:
        # DeepSpeed reports the global norm from its ZeRO and bf16/fp16 optimizers; plain fp32 ZeRO-0 clips with
        # torch and keeps no norm. There the gradients are whole and already all-reduced after the last backward.
        return zero_stage(self.plan.ds_config) == 0 and precision(self.plan.ds_config) == "fp32"

    def _full_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads).item()) if grads else float("nan")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        kw = dict(micro_batch=self.micro_batch, dp_size=self.plan.dp_size, max_batches=self.plan.run.eval_batches)
        mine = eval_batches(self.split.val, dp_rank=self.rank, **kw)
        # Every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively inside
        # forward). With a tiny validation split high ranks can get no batch: they run a weight-0 forward.
        n_forwards = len(eval_batches(self.split.val, dp_rank=0, **kw))
        sums = torch.zeros(2, device=self.engine.device, dtype=torch.float64)
        for i in range(n_forwards):
            indices = mine[i] if i < len(mine) else []
            loss = self._loss(self._tensor(indices or [self.split.val[0]]))
            if indices:
                sums[0] += loss.double() * len(indices)
                sums[1] += len(indices)
        dist.all_reduce(sums)
        self.engine.train()
        if sums[1] == 0:
            return {}
        loss = (sums[0] / sums[1]).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sequences": int(sums[1].item())}

    def _global_mean(self, value: torch.Tensor) -> float:
        value = value.clone().float()
        dist.all_reduce(value)
        return (value / self.plan.dp_size).item()

    # -- the loop -----------------------------------------------------------------------------------------------
    def save(self) -> float:
        """Save and commit a checkpoint; returns the seconds the loop stalled for it."""
        started = time.perf_counter()
        tag = checkpoint.tag_for_step(self.step)
        if self.folder_owner:
            warning = checkpoint.space_warning(self.save_dir, tag, self.checkpoint_bytes)
            if warning:
                log.warning("%s", warning)
        extra = checkpoint.client_state(
            state=checkpoint.TrainState(self.step, self.loader.consumed_samples),
            run_config=self.plan.run.to_dict(), ds_config=self.plan.ds_config,
            model_config=self.plan.model_config.to_dict(), dp_size=self.plan.dp_size,
            data_tokens=self.windows.num_tokens,
        )
        # The upload worker holds off while the files are written: the save gets the disk and cores to itself.
        with self.publisher.saving():
            committed = checkpoint.save(
                self.engine, self.save_dir, checkpoint.TrainState(self.step, self.loader.consumed_samples), extra,
                owner=self.folder_owner, run_id=self.publisher.identity.run_id, losses=self.last_losses,
                expected_bytes=self.checkpoint_bytes,
            )
        if committed is not None and committed.files:
            self.checkpoint_bytes = sum(f.size for f in committed.files.values())
        self.last_saved_step = self.step
        saved = time.perf_counter()
        self.publisher.committed(tag)
        stall = time.perf_counter() - started
        # stall_s: all the loop lost to this save; submit_s: the part the sync hand-off (or inline upload) took.
        self.metrics.record(self.step, "checkpoint", {"stall_s": stall, "submit_s": time.perf_counter() - saved})
        log.info("saved checkpoint %s in %.2f s", self.save_dir / tag, stall)
        self.apply_retention()
        return stall

    def apply_retention(self) -> None:
        if not self.folder_owner:
            return
        deleted = checkpoint.apply_retention(self.save_dir, self.plan.run.keep_last_n,
                                             may_delete=self.publisher.may_delete)
        if deleted:
            log.info("removed local checkpoint(s) %s (keep_last_n=%d)", ", ".join(deleted), self.plan.run.keep_last_n)

    def too_many_unpublished(self) -> bool:
        """After a save, on every rank: are more than max_unpublished_checkpoints checkpoints kept locally because
        publishing fails? Only the uploader ranks know; one tiny all-reduce per save makes every rank stop at the
        same step."""
        limit = self.plan.run.max_unpublished_checkpoints
        if not limit or self.plan.run.sync_to is None:
            return False
        return self._any_rank(self.publisher.enabled and len(self.publisher.poll().stuck) > limit)

    def log_sync_status(self) -> None:
        if not self.publisher.enabled:
            return
        self.metrics.record(self.step, "sync", self.publisher.metrics())

    def _stop_agreed(self) -> bool:
        """A SIGTERM seen by any rank stops all of them at the same step (each must call save_checkpoint)."""
        return self._any_rank(self.stop_requested)

    def _any_rank(self, mine: bool) -> bool:
        """True on every rank when it is true on any (one tiny all-reduce; none with a single rank)."""
        if self.plan.dp_size == 1:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=self.engine.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def train(self, *, until_step: int | None = None, final: bool = True) -> dict[str, Any]:
        """Train to max_steps (or to `until_step`, for benchmarks that run the loop in slices).

        `final`: save the last step, flush uploads and close the loader and metrics at the end."""

        run = self.plan.run
        end = run.max_steps if until_step is None else min(until_step, run.max_steps)
        if not self._announced:
            self._announced = True
            log.info(
                "training %s: %d steps from step %d, micro-batch %d x accumulation %d x %d ranks = %d sequences "
                "(%d tokens) per step, ZeRO-%d, %s",
                run.model, run.max_steps, self.step, self.micro_batch, self.grad_accum, self.plan.dp_size,
                self.plan.ds_config["train_batch_size"], self.tokens_per_step, zero_stage(self.plan.ds_config),
                precision(self.plan.ds_config),
            )
        bar = tqdm(total=run.max_steps, initial=self.step, disable=not self.is_rank0, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        self.timer.reset()
        throughput = Throughput(self.tokens_per_step, self.timer)
        loss_sum = torch.zeros((), device=self.engine.device)
        loss_count = 0
        summary: dict[str, Any] = {"start_step": self.step}
        redirect = logging_redirect_tqdm(loggers=[log])  # log lines above the bar, not glued onto it
        redirect.__enter__()
        try:
            while self.step < end:
                log_now = (self.step + 1) % run.log_steps == 0 or self.step + 1 == run.max_steps
                lr = float(self.engine.get_lr()[0])  # the rate this step uses (the scheduler moves in step())
                loss, grad_norm = self.train_step(want_grad_norm=log_now)
                loss_sum += loss
                loss_count += 1
                self.step += 1
                throughput.step()
                bar.update(1)
                if log_now:
                    values = {
                        "loss": self._global_mean(loss_sum / loss_count),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "consumed_samples": self.loader.consumed_samples,
                        **self.perf_values(throughput.read_and_reset()),
                    }
                    loss_sum.zero_()
                    loss_count = 0
                    self.metrics.record(self.step, "train", values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
                    log.info(
                        "step %d: loss=%.4f lr=%.3e grad_norm=%.3f | %s",
                        self.step, values["loss"], values["lr"], values["grad_norm"], perf_text(values),
                    )
                    summary.setdefault("first_loss", values["loss"])
                    summary["last_loss"] = values["loss"]
                    self.last_losses["train_loss"] = values["loss"]
                    summary["tokens_per_s"] = values["tokens_per_s"]
                if run.eval_steps and self.step % run.eval_steps == 0 and len(self.split.val):
                    ev = self.evaluate()
                    if ev:
                        self.metrics.record(self.step, "eval", ev)
                        log.info("step %d: validation loss=%.4f perplexity=%.2f", self.step, ev["loss"],
                                 ev["perplexity"])
                        summary["val_loss"] = ev["loss"]
                        self.last_losses.update(val_loss=ev["loss"], val_loss_step=self.step)
                    throughput.restart()
                if log_now:
                    self.log_sync_status()
                if self.step % run.save_steps == 0:
                    throughput.add_checkpoint_stall(self.save())
                    throughput.restart()
                    if self.too_many_unpublished():
                        summary["stopped_unpublished"] = True
                        break
                if self.step % STOP_CHECK_STEPS == 0 and self._stop_agreed():
                    log.warning("stop requested (SIGTERM) at step %d: saving and flushing uploads", self.step)
                    summary["stopped_by_signal"] = True
                    break
            stuck = summary.get("stopped_unpublished", False)
            if final and self.last_saved_step != self.step and not stuck:
                self.save()
        except BaseException:
            if final:
                self.close()
            raise
        finally:
            bar.close()
            redirect.__exit__(None, None, None)
        if final:
            try:
                # Only once the training bar is closed: the flush logs and draws a bar of its own. Stopping because
                # nothing gets published: a short flush, not the full upload_timeout_s.
                summary["sync"] = self.finish_uploads(timeout_s=min(60.0, run.upload_timeout_s) if stuck else None)
            finally:
                self.close()
        summary["end_step"] = self.step
        return summary

    def perf_values(self, reading: dict[str, float]) -> dict[str, Any]:
        """A Throughput reading plus TFLOP/s, MFU/HFU and the memory high-water mark."""
        return {**reading, **self.flops.rates(reading["tokens_per_s"]), **memory_high_water(self.device)}

    def close(self) -> None:
        self.loader.close()
        self.metrics.close()

    def finish_uploads(self, *, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Flush pending uploads (bounded), then retention for what became verified remote; report what is left."""
        if not self.publisher.enabled:
            return None
        status = self.publisher.close(timeout_s)
        self.metrics.record(self.step, "sync", self.publisher.metrics())
        self.apply_retention()
        return {"published": status.published, "unpublished": status.unpublished, "stuck": status.stuck,
                "skipped": status.skipped, "failed": status.failed, "failures": status.failures,
                "last_error": status.last_error}


