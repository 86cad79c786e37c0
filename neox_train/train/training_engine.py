"""The DeepSpeed engine for a checked plan: the model built (fresh, partitioned as it is created
under ZeRO-3, or from a HuggingFace folder), the engine initialised with the weight-decay groups,
compiled if asked, and the LR schedule aligned with the optimizer steps."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import deepspeed
import torch

# Imported here, not lazily inside build_model: zero.Init patches tensor constructors, and importing
# transformers' model code (which imports torch._dynamo) under that patch fails.
import transformers.models.gpt_neox.modeling_gpt_neox  # noqa: F401
from transformers.initialization import no_init_weights
from transformers.integrations import HfDeepSpeedConfig

from neox_train.ds_config import WSD, zero_stage
from neox_train.lm_loss import NeoxForCausalLM
from neox_train.log import log
from neox_train.model import build_model, load_hf_model, param_groups, use_training_attention
from neox_train.train.plan import RunPlan
from neox_train.train.schedule import wsd_scheduler


def build_engine(plan: RunPlan, *, resume_tag: str | None) -> tuple[Any, HfDeepSpeedConfig | None]:
    """(the engine, the HfDeepSpeedConfig to keep alive for as long as the engine under ZeRO-3, else
    None). `resume_tag`: the checkpoint the caller will load (its weights and LR iteration win over
    a fresh start)."""
    run = plan.run
    keepalive = None
    torch.manual_seed(run.seed)  # same init on every rank; DeepSpeed also broadcasts from rank 0
    weight_decay = float(
        plan.ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
    if zero_stage(plan.ds_config) == 3:
        # Partition parameters as they are created (a 1.2B fp32 model per rank would not fit in host
        # RAM x8), the way transformers does it: under a bare zero.Init the HF weight init would run
        # on empty partitions and RoPE buffers would be cast to bf16. HfDeepSpeedConfig must stay
        # alive (transformers keeps a weakref).
        keepalive = HfDeepSpeedConfig(plan.ds_config)
    if run.init_from_hf and resume_tag:
        log.info("resuming from %s: init_from_hf=%s is not used (the checkpoint's weights win)",
                 resume_tag, run.init_from_hf)
    if run.init_from_hf and not resume_tag:
        # from_pretrained partitions as it loads under ZeRO-3 (the HfDeepSpeedConfig above is
        # alive).
        model = load_hf_model(run.init_from_hf, attention=plan.model_config._attn_implementation)
        log.info("initialised the model from the HuggingFace folder %s", run.init_from_hf)
    else:
        # A resume overwrites every parameter from the checkpoint (and restores the RNG after it):
        # the random init would be thrown away. Skipping it saves ~8 ns per parameter (1.4 s at
        # 160M on CPU, measured; ~10 s at 1.2B). Buffers that are computed, not initialised (RoPE's
        # inv_freq), are still computed.
        with no_init_weights() if resume_tag else contextlib.nullcontext():
            model = (NeoxForCausalLM._from_config(plan.model_config)
                     if zero_stage(plan.ds_config) == 3 else build_model(plan.model_config))
    use_training_attention(model)
    model.lm_head.chunk = run.loss_chunk or model.lm_head.chunk
    if run.activation_checkpointing:
        # Every layer (the all-or-nothing recompute that flops_per_token counts for HFU).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    ds_config, lr_scheduler = plan.ds_config, None
    if ds_config.get("scheduler", {}).get("type") == WSD:
        # not a DeepSpeed type: DeepSpeed gets the scheduler itself (train/schedule.py)
        ds_config = {k: v for k, v in ds_config.items() if k != "scheduler"}
        lr_scheduler = wsd_scheduler(plan.ds_config["scheduler"]["params"])
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay), config=ds_config,
        lr_scheduler=lr_scheduler)
    if run.compile:
        # In place (nn.Module.compile): parameter names, and so checkpoints, stay those of the eager
        # model.
        engine.compile(backend=run.compile)
        log.info("model compiled with torch.compile backend %r (the first steps include "
                 "compilation)", run.compile)
    if not resume_tag and engine.lr_scheduler is not None:
        # DeepSpeed creates the scheduler at iteration -1 and steps it after each optimizer step, so
        # step 1 and step 2 would both run at the warmup start and the last step would miss the
        # floor. One step now aligns optimizer step s with scheduler iteration s-1. A resume
        # restores the iteration from the checkpoint. (torch warns of a scheduler step before the
        # first optimizer step: here that is the point.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            engine.lr_scheduler.step()
    return engine, keepalive
