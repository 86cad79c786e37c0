"""What the training loop reports, and where: the start line and what MFU is measured against; a
logged step (its loss averaged over the ranks, its throughput, FLOP/s and memory); an evaluation; a
skipped update; the upload status. They go to the log, the progress bar, the metrics files and the
run's summary.

Its own module because the wording and bookkeeping of the reports are a concern apart from the
loop's control flow: trainer.py decides when a step is logged, evaluated or judged bad, these
functions say so, and the loop reads as the order of a step.
"""

from __future__ import annotations

import math
from typing import Any

import deepspeed.comm as dist
import torch
from tqdm import tqdm

from neox_train.checkpoint.publish.publisher import Publisher
from neox_train.ds_config import precision, zero_stage
from neox_train.log import log
from neox_train.model import flops_per_token
from neox_train.train.guard import LossGuard, StepOutcome
from neox_train.train.metrics import Metrics
from neox_train.train.perf import (
    FlopsAccounting,
    device_name,
    memory_high_water,
    perf_text,
    resolve_peak,
)
from neox_train.train.plan import RunPlan


def flops_accounting(plan: RunPlan, device: torch.device) -> FlopsAccounting:
    """The FLOPs per token (model and hardware) against the device's peak; logs what MFU is
    measured against."""
    run = plan.run
    peak = resolve_peak(device_name(device), precision(plan.ds_config), run.peak_tflops)
    flops = FlopsAccounting(
        model_flops_per_token=flops_per_token(plan.model_config, run.seq_len),
        hardware_flops_per_token=flops_per_token(
            plan.model_config, run.seq_len,
            activation_checkpointing=run.activation_checkpointing
        ),
        num_devices=plan.dp_size,
        peak=peak,
    )
    log.info("MFU %s",
             f"against {peak.source}" if peak.tflops else f"not reported: {peak.source}")
    return flops


def announce(plan: RunPlan, *, step: int, micro_batch: int, grad_accum: int,
             tokens_per_step: int) -> None:
    """The "training ..." line: steps, batch shape, ZeRO stage and precision."""
    run = plan.run
    log.info(
        "training %s: %d steps from step %d, micro-batch %d x accumulation %d x %d ranks = "
        "%d sequences (%d tokens) per step, ZeRO-%d, %s",
        run.model, run.max_steps, step, micro_batch, grad_accum,
        plan.dp_size, plan.ds_config["train_batch_size"], tokens_per_step,
        zero_stage(plan.ds_config), precision(plan.ds_config),
    )


def global_mean(value: torch.Tensor, dp_size: int) -> float:
    """The mean of `value` over the data-parallel ranks (the logged loss)."""
    value = value.clone().float()
    dist.all_reduce(value)
    return (value / dp_size).item()


def perf_values(reading: dict[str, float], flops: FlopsAccounting,
                device: torch.device) -> dict[str, Any]:
    """A Throughput reading plus TFLOP/s, MFU/HFU and the memory high-water mark."""
    return {**reading, **flops.rates(reading["tokens_per_s"]),
            **memory_high_water(device)}


def logged_step(step: int, values: dict[str, Any], *, metrics: Metrics, bar: tqdm,
                summary: dict[str, Any], last_losses: dict[str, float | int]) -> None:
    """A logged step: its metrics record, the bar's postfix, the log line, the run's summary."""
    metrics.record(step, "train", values)
    bar.set_postfix(loss=f"{values['loss']:.4f}",
                    tok_s=f"{values['tokens_per_s']:.0f}")
    log.info(
        "step %d: loss=%.4f lr=%.3e grad_norm=%.3f | %s",
        step, values["loss"], values["lr"], values["grad_norm"],
        perf_text(values),
    )
    summary.setdefault("first_loss", values["loss"])
    summary["last_loss"] = values["loss"]
    last_losses["train_loss"] = values["loss"]
    summary["tokens_per_s_window"] = values["tokens_per_s"]


def run_rate(steps: int, tokens_per_step: int, seconds: float) -> float | None:
    """Tokens per second over a whole run (None before its first step)."""
    return steps * tokens_per_step / seconds if steps and seconds > 0 else None


def evaluation(step: int, ev: dict[str, float], *, metrics: Metrics, summary: dict[str, Any],
               last_losses: dict[str, float | int]) -> None:
    """An evaluation: its metrics record, the validation line (per source too), the summary."""
    metrics.record(step, "eval", ev)
    per = "".join(f", {k.removeprefix('loss/')} {v:.4f}" for k, v in ev.items()
                  if k.startswith("loss/"))
    log.info("step %d: validation loss=%.4f perplexity=%.2f%s", step,
             ev["loss"], ev["perplexity"], per)
    summary["val_loss"] = ev["loss"]
    last_losses.update(val_loss=ev["loss"], val_loss_step=step)


def skipped_update(step: int, outcome: StepOutcome, guard: LossGuard, metrics: Metrics) -> None:
    """An update the guard (or DeepSpeed) skipped: a warning, and the guard's counters."""
    log.warning("step %d: update skipped on every rank: %s (%d bad step(s) in a row)",
                step, outcome.reason, guard.streak)
    bad = outcome.loss if outcome.loss is not None and math.isfinite(outcome.loss) else None
    metrics.record(step, "guard", {**guard.counters(), "bad_loss": bad})


def sync_status(step: int, publisher: Publisher, metrics: Metrics) -> None:
    """The upload worker's counters, when checkpoints are published."""
    if not publisher.enabled:
        return
    metrics.record(step, "sync", publisher.metrics())
