"""Memory per GPU for every ZeRO stage and offload variant.

The estimate has four parts, each with its own source:

- model states (weights, gradients, optimizer states): DeepSpeed's own estimators,
  `estimate_zero2_model_states_mem_needs` (stages 1-2) and `estimate_zero3_model_states_mem_needs`
  (stage 3), called with the model's parameter counts; DeepSpeed has none for stages 0 and 1, whose
  few differences are written out in `model_state_bytes`;
- gradient-reduction buffers that DeepSpeed allocates from the JSON's bucket sizes
  (`comm_buffer_bytes`);
- activations, Korthikanti et al.'s per-layer formula (`activation_bytes`);
- the fp32 loss over the vocabulary, whole or a chunk at a time (`logits_bytes`).

Units: "GB" in names and output means GiB (2**30 bytes), the unit torch and nvidia-smi report GPU
memory in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from neox_train.ds_config import (
    OFFLOAD_ALL,
    OFFLOAD_NONE,
    OFFLOAD_OPTIMIZER,
    offload,
    snapshot_bytes_per_node,
    zero_stage,
)
from neox_train.model import build_model, count_parameters, hf_config
from neox_train.units import GIB

# Kept free on every GPU: the CUDA context, cuBLAS/NCCL workspaces (~1 GiB) and 10% for allocator
# fragmentation and short-lived tensors the estimate does not itemise.
RESERVED_GIB = 1.0


HEADROOM_FRACTION = 0.10


# DeepSpeed's defaults for keys a JSON leaves out (deepspeed/runtime/zero/config.py).
DS_DEFAULT_REDUCE_BUCKET = int(5e8)


DS_DEFAULT_PREFETCH_BUCKET = int(5e7)


# DeepSpeed's estimators take a CPU-side safety factor; 1.5 is their own default.
CPU_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model."""

    name: str
    total_params: int
    # the most parameters one module owns directly (ZeRO-3 gathers one at a time)
    largest_layer_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int  # the padded embedding size: the width of the logits
    attention: str = "sdpa"  # "eager" materialises the s x s scores (see activation_bytes)
    loss_chunk: int = 0  # tokens per chunk of the loss (run config loss_chunk); 0: whole logits


@functools.lru_cache(maxsize=16)
def model_shape(preset: str, padded_vocab: int, attention: str = "sdpa",
                loss_chunk: int = 0) -> ModelShape:
    """Counts from the real transformers model built on the meta device (no weights allocated)."""

    cfg = hf_config(preset, padded_vocab)
    model = build_model(cfg, device="meta")
    counts = count_parameters(model)
    # As DeepSpeed's own model_to_params (stage3.py) counts a layer: the parameters a module holds
    # itself. (Its helper cannot run on a meta model: it de-duplicates by data_ptr, which is 0 for
    # every meta tensor.)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(preset, counts.total, largest, cfg.hidden_size, cfg.num_hidden_layers,
                      cfg.num_attention_heads, cfg.vocab_size, attention, loss_chunk)


@dataclass(frozen=True, order=True)
class Variant:
    """A ZeRO stage with its offload; `ds_name` is the shipped JSON holding its zero_optimization
    section."""

    stage: int
    offload: str = OFFLOAD_NONE

    @property
    def ds_name(self) -> str:
        return f"zero{self.stage}" + ("" if self.offload == OFFLOAD_NONE else "_offload")

    @property
    def label(self) -> str:
        return {OFFLOAD_NONE: f"ZeRO-{self.stage}",
                OFFLOAD_OPTIMIZER: f"ZeRO-{self.stage} + optimizer offload",
                OFFLOAD_ALL: f"ZeRO-{self.stage} + optimizer and parameter offload"}[self.offload]

    @classmethod
    def of_ds_config(cls, ds_cfg: dict[str, Any]) -> "Variant":
        return cls(zero_stage(ds_cfg), offload(ds_cfg))


OFFLOAD_VARIANTS = (Variant(2, OFFLOAD_OPTIMIZER), Variant(3, OFFLOAD_ALL))


ALL_VARIANTS = tuple(Variant(s) for s in range(4)) + OFFLOAD_VARIANTS


def ladder(precision: str, forced_stage: int | None = None,
           forced_offload: bool = False) -> list[Variant]:
    """The variants in the order they are tried: cheapest communication first, offload last.

    bf16 starts at ZeRO-1: DeepSpeed 0.19 keeps fp32 master weights for bf16 only from stage 1 on
    (at stage 0 weights, gradients and Adam moments all stay bf16), so stage 0 is offered for fp32
    and fp16 only.
    """
    if forced_stage is not None:
        if not forced_offload:
            return [Variant(forced_stage)]
        return [v for v in OFFLOAD_VARIANTS if v.stage == forced_stage]
    stages = (1, 2, 3) if precision == "bf16" else (0, 1, 2, 3)
    return [Variant(s) for s in stages] + list(OFFLOAD_VARIANTS)


# -- the memory model ------------------------------------------------------------------------------
def model_state_bytes(variant: Variant, shape: ModelShape, *, gpus: int, nodes: int,
                      precision: str) -> tuple[int, int]:
    """(bytes per GPU, bytes of CPU memory per node) for weights, gradients and optimizer states.

    DeepSpeed's estimators assume 16-bit weights with fp32 master weights and Adam: per parameter 2
    bytes of 16-bit weights + 18 bytes (2 16-bit grads, 4 fp32 grads, 4 fp32 weights, 8 Adam
    moments), partitioned over the GPUs as each stage says. Stages 0 and 1 have no estimator and are
    written out against the same accounting.
    """
    # Deferred: deepspeed (~1.7 s at import) loads only when the planner estimates, not for
    # `neox-launch --help`.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = shape.total_params
    per_node = -(-gpus // nodes)
    offload = variant.offload != OFFLOAD_NONE
    if variant.stage == 0:
        # Nothing is partitioned: everything lives whole on every GPU.
        if precision == "fp32":
            gpu = 16 * P  # 4 weights + 4 grads + 8 Adam moments, no separate master copy
        elif precision == "bf16":
            # DeepSpeed's stage-0 bf16 path: bf16 weights, grads and Adam moments (2 + 2 + 4)
            gpu = 8 * P
        # fp16: the FP16 optimizer keeps fp32 master weights: DeepSpeed's accounting on one GPU
        else:
            _, gpu = estimate_zero2_model_states_mem_needs(
                P, 1, 1, cpu_offload=False, additional_buffer_factor=CPU_BUFFER_FACTOR)
        cpu, _ = estimate_zero2_model_states_mem_needs(P, per_node, nodes, cpu_offload=False,
                                                       additional_buffer_factor=CPU_BUFFER_FACTOR)
        return gpu, cpu
    if variant.stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, per_node, nodes, cpu_offload=offload,
                                                         additional_buffer_factor=CPU_BUFFER_FACTOR)
        if variant.stage == 1:
            # ZeRO-1 partitions optimizer states and master weights but keeps the 16-bit gradients
            # whole; the (ZeRO-2) estimator counted only a 1/N share of them.
            gpu += 2 * P if offload else 2 * P - (2 * P) // gpus
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            P, shape.largest_layer_params, per_node, nodes, cpu_offload=offload,
            cpu_offload_params=offload, zero_init=True, additional_buffer_factor=CPU_BUFFER_FACTOR)
    if precision == "fp32":
        # Weights and gradients are 4 bytes where the estimators count 2; add the difference where
        # they live.
        weights_whole = variant.stage < 3
        grads_whole = variant.stage < 2
        if weights_whole:
            gpu += 2 * P
        elif not offload:
            gpu += (2 * P) // gpus
        gpu += 2 * P if grads_whole else (2 * P) // gpus
    return int(gpu), int(cpu)


def comm_buffer_bytes(variant: Variant, zero_section: dict[str, Any], *, precision: str,
                      gpus: int) -> int:
    """Buffers DeepSpeed allocates from the JSON's bucket sizes (stage_1_and_2.py setup_buckets,
    stage3.py).

    With contiguous_gradients (default on) stages 1-3 reduce gradients through a reduce_bucket_size
    buffer, two with overlap_comm (double-buffered); ZeRO-3 also prefetches up to
    stage3_prefetch_bucket_size parameters. Stage 0 all-reduces in flattened buckets of the same
    size, and only when there is more than one GPU.
    """
    elem = 4 if precision == "fp32" else 2
    reduce_bucket = int(zero_section.get("reduce_bucket_size", DS_DEFAULT_REDUCE_BUCKET))
    if variant.stage == 0:
        return reduce_bucket * elem if gpus > 1 else 0
    contiguous = zero_section.get("contiguous_gradients", True)
    # DeepSpeed's default: on for stage 3 only
    overlap = zero_section.get("overlap_comm", variant.stage == 3)
    total = reduce_bucket * elem * (2 if overlap else 1) if contiguous else 0
    if variant.stage == 3:
        total += int(zero_section.get("stage3_prefetch_bucket_size",
                                      DS_DEFAULT_PREFETCH_BUCKET)) * elem
    return total


def activation_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, precision: str,
                     checkpointing: bool) -> int:
    """Activations saved for backward, per GPU.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq.
    1): one transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations. The 5as/h
    term is the s x s attention scores, their softmax and its dropout; PyTorch's SDPA (flash and
    memory-efficient kernels, the default) never materialises them, so a layer keeps 34*s*b*h;
    `attention: eager` pays the term. The 34 includes two 1-byte dropout masks although dropout is 0
    here: a ~6% margin we keep. fp32 activations take twice the bytes.

    With activation checkpointing a layer keeps only its input (2*s*b*h) and one layer's full set is
    live again while it is recomputed in backward. The final LayerNorm keeps its input and output
    for the head (4*s*b*h).
    """
    sbh = seq_len * micro_batch * shape.hidden_size
    scale = 2 if precision == "fp32" else 1
    per_layer = 34 * sbh
    if shape.attention == "eager":
        per_layer += 5 * shape.num_heads * seq_len * seq_len * micro_batch
    if checkpointing:
        layers = shape.num_layers * 2 * sbh + per_layer
    else:
        layers = shape.num_layers * per_layer
    return scale * (layers + 4 * sbh)


def logits_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int) -> int:
    """The loss over the vocabulary, in fp32.

    Whole logits (loss_chunk 0: `logits.float()`, then cross_entropy): the peak is the start of
    backward, where the fp32 log-softmax output saved by forward, the incoming gradient and the
    gradient it produces are live at once, 3 x 4 bytes per logit. (Forward's peak, 16-bit logits +
    fp32 copy + log-softmax output = 10 bytes, is lower.)

    Chunked (lm_loss.py): one chunk of logits at a time, in forward and again in backward, where its
    16-bit logits, fp32 softmax and the 16-bit gradient are live (10 bytes per logit of the chunk),
    with the output weight's gradient summed in fp32 (4 bytes per weight).
    """
    tokens = micro_batch * seq_len
    if not shape.loss_chunk:
        return 12 * tokens * shape.vocab_size
    return (10 * min(shape.loss_chunk, tokens) * shape.vocab_size
            + 4 * shape.vocab_size * shape.hidden_size)


def usable_bytes(gpu_mem_gib: float) -> float:
    return (gpu_mem_gib * (1 - HEADROOM_FRACTION) - RESERVED_GIB) * GIB


@dataclass(frozen=True)
class Estimate:
    variant: Variant
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    model_states: int
    comm_buffers: int
    activations: int
    logits: int
    # model states on the host (DeepSpeed's estimate) + the asynchronous save's snapshot
    cpu_per_node: int
    snapshot_per_node: int = 0
    loss_chunk: int = 0  # the loss's chunk (ModelShape.loss_chunk), for the breakdown's wording

    @property
    def total(self) -> int:
        return self.model_states + self.comm_buffers + self.activations + self.logits

    @property
    def label(self) -> str:
        checkpointing = " + activation checkpointing" if self.activation_checkpointing else ""
        return f"{self.variant.label}{checkpointing} at micro-batch {self.micro_batch}"

    def breakdown_gb(self) -> dict[str, float]:
        return {"model_states": gb(self.model_states), "comm_buffers": gb(self.comm_buffers),
                "activations": gb(self.activations), "logits": gb(self.logits)}


def estimate(variant: Variant, shape: ModelShape, *, zero_section: dict[str, Any], seq_len: int,
             micro_batch: int, grad_accum: int, precision: str, gpus: int, nodes: int,
             checkpointing: bool) -> Estimate:
    gpu_states, cpu = model_state_bytes(variant, shape, gpus=gpus, nodes=nodes, precision=precision)
    # async_save (the default) copies the rank's share of the model states to host memory at every
    # save.
    snapshot = snapshot_bytes_per_node(shape.total_params,
                                       precision if precision != "no" else "fp32", variant.stage,
                                       num_nodes=nodes, world_size=gpus)
    return Estimate(
        variant=variant, activation_checkpointing=checkpointing, micro_batch=micro_batch,
        grad_accum=grad_accum, model_states=gpu_states,
        comm_buffers=comm_buffer_bytes(variant, zero_section, precision=precision, gpus=gpus),
        activations=activation_bytes(shape, seq_len=seq_len, micro_batch=micro_batch,
                                     precision=precision, checkpointing=checkpointing),
        logits=logits_bytes(shape, seq_len=seq_len, micro_batch=micro_batch),
        cpu_per_node=cpu + snapshot,
        snapshot_per_node=snapshot,
        loss_chunk=shape.loss_chunk,
    )


def gb(n: float) -> float:
    return round(n / GIB, 2)
