"""Memory per GPU for every ZeRO stage and offload variant, and the choice of the cheapest one that fits.

The estimate has four parts, each with its own source:

- model states (weights, gradients, optimizer states): DeepSpeed's own estimators,
  `estimate_zero2_model_states_mem_needs` (stages 1-2) and `estimate_zero3_model_states_mem_needs` (stage 3),
  called with the model's parameter counts; DeepSpeed has none for stages 0 and 1, whose few differences are
  written out in `model_state_bytes`;
- gradient-reduction buffers that DeepSpeed allocates from the JSON's bucket sizes (`comm_buffer_bytes`);
- activations, Korthikanti et al.'s per-layer formula (`activation_bytes`);
- the fp32 loss over the vocabulary (`logits_bytes`).

The choice goes cheapest-communication first: the lowest ZeRO stage that fits with headroom, else optimizer
(then parameter) offload, else the same with activation checkpointing; only when nothing fits at the configured
micro-batch is it lowered, with gradient accumulation raised so micro x accumulation (and so the global batch)
stays as configured. Pure functions of numbers, so a 64-GPU table costs nothing and is testable on a laptop.

Units: "GB" in names and output means GiB (2**30 bytes), the unit torch and nvidia-smi report GPU memory in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from neox_train.ds_config import OFFLOAD_ALL, OFFLOAD_NONE, OFFLOAD_OPTIMIZER, offload, zero_stage
from neox_train.errors import ConfigError

GIB = 2**30
# Kept free on every GPU: the CUDA context, cuBLAS/NCCL workspaces (~1 GiB) and 10% for allocator fragmentation
# and short-lived tensors the estimate does not itemise.
RESERVED_GIB = 1.0
HEADROOM_FRACTION = 0.10
# GPUs per node assumed where no hostfile says otherwise (the planner table for 16 and 64 GPUs).
DEFAULT_GPUS_PER_NODE = 8
# DeepSpeed's defaults for keys a JSON leaves out (deepspeed/runtime/zero/config.py).
DS_DEFAULT_REDUCE_BUCKET = int(5e8)
DS_DEFAULT_PREFETCH_BUCKET = int(5e7)
# DeepSpeed's estimators take a CPU-side safety factor; 1.5 is their own default.
CPU_BUFFER_FACTOR = 1.5



class PlanError(ConfigError):
    """No variant fits (or a request the planner cannot serve); str(err) is one line with the numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model."""

    name: str
    total_params: int
    largest_layer_params: int  # the most parameters one module owns directly (ZeRO-3 gathers one at a time)
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int  # the padded embedding size: the width of the logits
    attention: str = "sdpa"  # "eager" materialises the s x s scores (see activation_bytes)


@functools.lru_cache(maxsize=16)
def model_shape(preset: str, padded_vocab: int, attention: str = "sdpa") -> ModelShape:
    """Counts from the real transformers model built on the meta device (no weights allocated)."""
    from neox_train.model import build_model, count_parameters, hf_config

    cfg = hf_config(preset, padded_vocab)
    model = build_model(cfg, device="meta")
    counts = count_parameters(model)
    # As DeepSpeed's own model_to_params (stage3.py) counts a layer: the parameters a module holds itself.
    # (Its helper cannot run on a meta model: it de-duplicates by data_ptr, which is 0 for every meta tensor.)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(preset, counts.total, largest, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                      cfg.vocab_size, attention)


@dataclass(frozen=True, order=True)
class Variant:
    """A ZeRO stage with its offload; `ds_name` is the shipped JSON holding its zero_optimization section."""

    stage: int
    offload: str = OFFLOAD_NONE

    @property
    def ds_name(self) -> str:
        return f"zero{self.stage}" + ("" if self.offload == OFFLOAD_NONE else "_offload")

    @property
    def label(self) -> str:
        return {OFFLOAD_NONE: f"ZeRO-{self.stage}", OFFLOAD_OPTIMIZER: f"ZeRO-{self.stage} + optimizer offload",
                OFFLOAD_ALL: f"ZeRO-{self.stage} + optimizer and parameter offload"}[self.offload]

    @classmethod
    def of_ds_config(cls, ds_cfg: dict[str, Any]) -> "Variant":
        return cls(zero_stage(ds_cfg), offload(ds_cfg))


OFFLOAD_VARIANTS = (Variant(2, OFFLOAD_OPTIMIZER), Variant(3, OFFLOAD_ALL))
ALL_VARIANTS = tuple(Variant(s) for s in range(4)) + OFFLOAD_VARIANTS


def ladder(precision: str, forced_stage: int | None = None, forced_offload: bool = False) -> list[Variant]:
    """The variants in the order they are tried: cheapest communication first, offload last.

    bf16 starts at ZeRO-1: DeepSpeed 0.19 keeps fp32 master weights for bf16 only from stage 1 on (at stage 0
    weights, gradients and Adam moments all stay bf16), so stage 0 is offered for fp32 and fp16 only.
    """
    if forced_stage is not None:
        if not forced_offload:
            return [Variant(forced_stage)]
        return [v for v in OFFLOAD_VARIANTS if v.stage == forced_stage]
    stages = (1, 2, 3) if precision == "bf16" else (0, 1, 2, 3)
    return [Variant(s) for s in stages] + list(OFFLOAD_VARIANTS)


# -- the memory model ---------------------------------------------------------------------------------------------
def model_state_bytes(variant: Variant, shape: ModelShape, *, gpus: int, nodes: int, precision: str) -> tuple[int, int]:
    """(bytes per GPU, bytes of CPU memory per node) for weights, gradients and optimizer states.

    DeepSpeed's estimators assume 16-bit weights with fp32 master weights and Adam: per parameter 2 bytes of
    16-bit weights + 18 bytes (2 16-bit grads, 4 fp32 grads, 4 fp32 weights, 8 Adam moments), partitioned over
    the GPUs as each stage says. Stages 0 and 1 have no estimator and are written out against the same accounting.
    """
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
            gpu = 8 * P  # DeepSpeed's stage-0 bf16 path: bf16 weights, grads and Adam moments (2 + 2 + 4)
        else:  # fp16: the FP16 optimizer keeps fp32 master weights: DeepSpeed's accounting on one GPU
            _, gpu = estimate_zero2_model_states_mem_needs(P, 1, 1, cpu_offload=False,
                                                           additional_buffer_factor=CPU_BUFFER_FACTOR)
        cpu, _ = estimate_zero2_model_states_mem_needs(P, per_node, nodes, cpu_offload=False,
                                                       additional_buffer_factor=CPU_BUFFER_FACTOR)
        return gpu, cpu
    if variant.stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, per_node, nodes, cpu_offload=offload,
                                                         additional_buffer_factor=CPU_BUFFER_FACTOR)
        if variant.stage == 1:
            # ZeRO-1 partitions optimizer states and master weights but keeps the 16-bit gradients whole;
            # the (ZeRO-2) estimator counted only a 1/N share of them.
            gpu += 2 * P if offload else 2 * P - (2 * P) // gpus
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            P, shape.largest_layer_params, per_node, nodes, cpu_offload=offload, cpu_offload_params=offload,
            zero_init=True, additional_buffer_factor=CPU_BUFFER_FACTOR)
    if precision == "fp32":
        # Weights and gradients are 4 bytes where the estimators count 2; add the difference where they live.
        weights_whole = variant.stage < 3
        grads_whole = variant.stage < 2
        if weights_whole:
            gpu += 2 * P
        elif not offload:
            gpu += (2 * P) // gpus
        gpu += 2 * P if grads_whole else (2 * P) // gpus
    return int(gpu), int(cpu)


def comm_buffer_bytes(variant: Variant, zero_section: dict[str, Any], *, precision: str, gpus: int) -> int:
    """Buffers DeepSpeed allocates from the JSON's bucket sizes (stage_1_and_2.py setup_buckets, stage3.py).

    With contiguous_gradients (default on) stages 1-3 reduce gradients through a reduce_bucket_size buffer, two
    with overlap_comm (double-buffered); ZeRO-3 also prefetches up to stage3_prefetch_bucket_size parameters.
    Stage 0 all-reduces in flattened buckets of the same size, and only when there is more than one GPU.
    """
    elem = 4 if precision == "fp32" else 2
    reduce_bucket = int(zero_section.get("reduce_bucket_size", DS_DEFAULT_REDUCE_BUCKET))
    if variant.stage == 0:
        return reduce_bucket * elem if gpus > 1 else 0
    contiguous = zero_section.get("contiguous_gradients", True)
    overlap = zero_section.get("overlap_comm", variant.stage == 3)  # DeepSpeed's default: on for stage 3 only
    total = reduce_bucket * elem * (2 if overlap else 1) if contiguous else 0
    if variant.stage == 3:
        total += int(zero_section.get("stage3_prefetch_bucket_size", DS_DEFAULT_PREFETCH_BUCKET)) * elem
    return total


def activation_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, precision: str, checkpointing: bool) -> int:
    """Activations saved for backward, per GPU.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1): one
    transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations. The 5as/h term is the s x s
    attention scores, their softmax and its dropout; PyTorch's SDPA (flash and memory-efficient kernels, the
    default) never materialises them, so a layer keeps 34*s*b*h; `attention: eager` pays the term. The 34
    includes two 1-byte dropout masks although dropout is 0 here: a ~6% margin we keep. fp32 activations take
    twice the bytes.

    With activation checkpointing a layer keeps only its input (2*s*b*h) and one layer's full set is live again
    while it is recomputed in backward. The final LayerNorm keeps its input and output for the head (4*s*b*h).
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
    """The loss over the vocabulary: neox-train computes it in fp32 (`logits.float()`, then cross_entropy).

    The peak is the start of backward: the fp32 log-softmax output saved by forward, the incoming gradient and
    the gradient it produces are live at once, 3 x 4 bytes per logit. (Forward's peak, 16-bit logits + fp32 copy
    + log-softmax output = 10 bytes, is lower.)
    """
    return 12 * micro_batch * seq_len * shape.vocab_size


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
    cpu_per_node: int

    @property
    def total(self) -> int:
        return self.model_states + self.comm_buffers + self.activations + self.logits

    @property
    def label(self) -> str:
        return (f"{self.variant.label}{' + activation checkpointing' if self.activation_checkpointing else ''}"
                f" at micro-batch {self.micro_batch}")

    def breakdown_gb(self) -> dict[str, float]:
        return {"model_states": _gb(self.model_states), "comm_buffers": _gb(self.comm_buffers),
                "activations": _gb(self.activations), "logits": _gb(self.logits)}


def estimate(variant: Variant, shape: ModelShape, *, zero_section: dict[str, Any], seq_len: int, micro_batch: int,
             grad_accum: int, precision: str, gpus: int, nodes: int, checkpointing: bool) -> Estimate:
    gpu_states, cpu = model_state_bytes(variant, shape, gpus=gpus, nodes=nodes, precision=precision)
    return Estimate(
        variant=variant, activation_checkpointing=checkpointing, micro_batch=micro_batch, grad_accum=grad_accum,
        model_states=gpu_states,
        comm_buffers=comm_buffer_bytes(variant, zero_section, precision=precision, gpus=gpus),
        activations=activation_bytes(shape, seq_len=seq_len, micro_batch=micro_batch, precision=precision,
                                     checkpointing=checkpointing),
        logits=logits_bytes(shape, seq_len=seq_len, micro_batch=micro_batch),
        cpu_per_node=cpu,
    )


def _gb(n: float) -> float:
    return round(n / GIB, 2)


# -- the choice ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRequest:
    shape: ModelShape
    seq_len: int
    micro_batch: int  # as configured (run config over DeepSpeed JSON)
    grad_accum: int
    precision: str  # bf16 | fp16 | fp32
    gpus: int
    nodes: int
    gpu_mem_gib: float | None  # None: unknown (CPU ranks): the configured variant is used as is
    gpu_mem_source: str
    configured: Variant  # what the run's DeepSpeed JSON says
    configured_checkpointing: bool = False
    forced_stage: int | None = None
    forced_offload: bool = False
    # zero_optimization section per variant (the run's own for its variant, the shipped JSON's for the others)
    zero_sections: dict[Variant, dict[str, Any]] = field(default_factory=dict)

    def zero_section(self, variant: Variant) -> dict[str, Any]:
        return self.zero_sections.get(variant, {"stage": variant.stage})


@dataclass(frozen=True)
class Plan:
    variant: Variant
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    train_batch: int
    gpus: int
    nodes: int
    precision: str
    chosen: Estimate
    fits: bool | None  # None: GPU memory unknown
    gpu_mem_gib: float | None
    gpu_mem_source: str
    reason: str
    considered: tuple[Estimate, ...]
    shape: ModelShape
    seq_len: int
    warnings: tuple[str, ...] = ()

    @property
    def zero_stage(self) -> int:
        return self.variant.stage

    def to_dict(self) -> dict[str, Any]:
        usable = None if self.gpu_mem_gib is None else _gb(usable_bytes(self.gpu_mem_gib))
        return {
            "zero_stage": self.variant.stage,
            "offload": self.variant.offload,
            "ds_config": self.variant.ds_name,
            "activation_checkpointing": self.activation_checkpointing,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "train_batch": self.train_batch,
            "gpus": self.gpus,
            "nodes": self.nodes,
            "precision": self.precision,
            "est_gb_per_gpu": _gb(self.chosen.total),
            "est_breakdown_gb": self.chosen.breakdown_gb(),
            "est_cpu_gb_per_node": _gb(self.chosen.cpu_per_node),
            "gpu_mem_gb": self.gpu_mem_gib,
            "gpu_mem_source": self.gpu_mem_source,
            "usable_gb_per_gpu": usable,
            "fits": self.fits,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "model": {"preset": self.shape.name, "params": self.shape.total_params,
                      "largest_layer_params": self.shape.largest_layer_params, "seq_len": self.seq_len,
                      "vocab_size": self.shape.vocab_size},
            "considered": [
                {"ds_config": e.variant.ds_name, "zero_stage": e.variant.stage, "offload": e.variant.offload,
                 "activation_checkpointing": e.activation_checkpointing, "micro_batch": e.micro_batch,
                 "est_gb_per_gpu": _gb(e.total),
                 "fits": None if self.gpu_mem_gib is None else e.total <= usable_bytes(self.gpu_mem_gib)}
                for e in self.considered
            ],
            "headroom": {"reserved_gb": RESERVED_GIB, "fraction": HEADROOM_FRACTION},
        }


def micro_batch_candidates(micro_batch: int) -> list[int]:
    """The configured micro-batch, then its divisors downwards: each keeps micro x accumulation unchanged."""
    return [m for m in range(micro_batch, 0, -1) if micro_batch % m == 0]


def choose(req: PlanRequest) -> Plan:
    """The plan for `req`: see the module docstring for the order of preference."""
    per_gpu = req.micro_batch * req.grad_accum

    def est(variant: Variant, ac: bool, micro: int) -> Estimate:
        return estimate(variant, req.shape, zero_section=req.zero_section(variant), seq_len=req.seq_len,
                        micro_batch=micro, grad_accum=per_gpu // micro, precision=req.precision, gpus=req.gpus,
                        nodes=req.nodes, checkpointing=ac)

    def plan(e: Estimate, fits: bool | None, reason: str, considered: list[Estimate], warnings=()) -> Plan:
        return Plan(variant=e.variant, activation_checkpointing=e.activation_checkpointing, micro_batch=e.micro_batch,
                    grad_accum=e.grad_accum, train_batch=e.micro_batch * e.grad_accum * req.gpus, gpus=req.gpus,
                    nodes=req.nodes, precision=req.precision, chosen=e, fits=fits, gpu_mem_gib=req.gpu_mem_gib,
                    gpu_mem_source=req.gpu_mem_source, reason=reason, considered=tuple(considered), shape=req.shape,
                    seq_len=req.seq_len, warnings=tuple(warnings))

    forced = None if req.forced_stage is None else ladder(req.precision, req.forced_stage, req.forced_offload)[0]
    if req.gpu_mem_gib is None:
        variant = forced or req.configured
        e = est(variant, req.configured_checkpointing, req.micro_batch)
        why = "forced by --zero" if forced else "as the DeepSpeed JSON says"
        return plan(e, None, f"GPU memory unknown ({req.gpu_mem_source}): {variant.label} {why}, micro-batch and "
                             f"accumulation as configured, nothing checked against a memory limit", [e])

    usable = usable_bytes(req.gpu_mem_gib)
    variants = ladder(req.precision, req.forced_stage, req.forced_offload)
    ac_options = [True] if req.configured_checkpointing else [False, True]
    considered: list[Estimate] = []
    for micro in micro_batch_candidates(req.micro_batch):
        for ac in ac_options:
            for variant in variants:
                e = est(variant, ac, micro)
                considered.append(e)
                if e.total <= usable:
                    return plan(e, True, _fit_reason(e, considered, req, usable), considered)
    smallest = min(considered, key=lambda e: e.total)
    hardware = f"{req.gpus} GPU{'s' if req.gpus > 1 else ''} of {req.gpu_mem_gib:g} GiB (usable {_gb(usable)} GiB each)"
    if forced is not None:
        e = est(forced, req.configured_checkpointing, req.micro_batch)
        warning = (f"--zero {forced.stage}{' --offload' if req.forced_offload else ''} will not fit {hardware}: "
                   f"{e.label} needs {_gb(e.total)} GiB per GPU ({_breakdown(e)}); the smallest option with it, "
                   f"{smallest.label}, needs {_gb(smallest.total)} GiB")
        return plan(e, False, f"{forced.label} forced by --zero", considered, [warning])
    raise PlanError(
        f"{req.shape.name} ({req.shape.total_params:,} parameters, seq_len {req.seq_len}, {req.precision}) does not "
        f"fit {hardware}: the smallest option, {smallest.label}, needs {_gb(smallest.total)} GiB per GPU "
        f"({_breakdown(smallest)}); use more GPUs, GPUs with more memory, a shorter --seq-len, or smaller "
        f"reduce_bucket_size in the DeepSpeed JSON"
    )


def _breakdown(e: Estimate) -> str:
    b = e.breakdown_gb()
    return (f"model states {b['model_states']}, buffers {b['comm_buffers']}, activations {b['activations']}, "
            f"logits {b['logits']} GiB")


def _fit_reason(chosen: Estimate, considered: list[Estimate], req: PlanRequest, usable: float) -> str:
    hw = f"{req.gpus} x {req.gpu_mem_gib:g} GiB"
    text = f"{chosen.label} fits {hw}: {_gb(chosen.total)} of {_gb(usable)} usable GiB per GPU ({_breakdown(chosen)})"
    rejected = [e for e in considered if e is not chosen]
    if rejected:
        shown = "; ".join(f"{e.label} {_gb(e.total)}" for e in rejected[:8])
        more = f" and {len(rejected) - 8} more" if len(rejected) > 8 else ""
        text += f". Did not fit (GiB per GPU): {shown}{more}"
    if chosen.micro_batch != req.micro_batch:
        text += (f". Micro-batch lowered {req.micro_batch} -> {chosen.micro_batch}, accumulation raised "
                 f"{req.grad_accum} -> {chosen.grad_accum}: the same {req.micro_batch * req.grad_accum} sequences per "
                 f"GPU per step")
    return text


def plan_table(make_request, gpu_counts: list[int], mem_sizes: list[float]) -> list[dict[str, Any]]:
    """One plan per (GPU count, memory size): `make_request(gpus, nodes, mem_gib)` builds each request.

    A combination where nothing fits becomes a row with `error` instead of raising."""
    rows = []
    for gpus in gpu_counts:
        nodes = -(-gpus // DEFAULT_GPUS_PER_NODE)
        for mem in mem_sizes:
            try:
                rows.append(choose(make_request(gpus, nodes, mem)).to_dict())
            except PlanError as e:
                rows.append({"gpus": gpus, "nodes": nodes, "gpu_mem_gb": mem, "error": str(e)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (GPUs, memory) with the choice and its estimate."""
    head = ("| GPUs | GPU memory | ZeRO | offload | act. ckpt | micro x accum | global batch | est. GiB/GPU "
            "(states + buffers + activations + logits) | usable GiB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['gpu_mem_gb']:g} GB | does not fit | | | | | | |")
            continue
        b = r["est_breakdown_gb"]
        lines.append(
            f"| {r['gpus']} | {r['gpu_mem_gb']:g} GB | {r['zero_stage']} | {r['offload']} | "
            f"{'yes' if r['activation_checkpointing'] else 'no'} | {r['micro_batch']} x {r['grad_accum']} | "
            f"{r['train_batch']} | {r['est_gb_per_gpu']:.1f} ({b['model_states']:.1f} + {b['comm_buffers']:.1f} + "
            f"{b['activations']:.1f} + {b['logits']:.1f}) | {r['usable_gb_per_gpu']:.1f} |"
        )
    return "\n".join(lines)



# -- from a run config --------------------------------------------------------------------------------------------
def detect_gpu_memory() -> tuple[float | None, str]:
    """(GiB of the smallest visible GPU, where the number came from); (None, why) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device and no --gpu-mem-gb"
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    smallest = min(props, key=lambda p: p.total_memory)
    # The smallest card bounds every rank; other nodes are assumed to hold the same GPUs.
    return round(smallest.total_memory / GIB, 2), f"read from cuda ({len(props)} x {smallest.name})"


def run_precision(run, ds_cfg: dict[str, Any]) -> str:
    if run.mixed_precision is not None:
        return {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}[run.mixed_precision]
    from neox_train.ds_config import precision

    return precision(ds_cfg)


def configured_batch(run, ds_cfg: dict[str, Any], gpus: int) -> tuple[int, int]:
    """(micro-batch, accumulation) as neox-train would resolve them at `gpus` ranks (run config over JSON)."""
    from neox_train.ds_config import check_batch

    micro = run.micro_batch if run.micro_batch is not None else ds_cfg.get("train_micro_batch_size_per_gpu")
    accum = run.grad_accum if run.grad_accum is not None else ds_cfg.get("gradient_accumulation_steps")
    train = None if (run.micro_batch is not None or run.grad_accum is not None) else ds_cfg.get("train_batch_size")
    _, micro, accum = check_batch(dp_size=gpus, train_batch=train, micro_batch=micro, grad_accum=accum)
    return micro, accum


def tokenizer_vocab(run) -> int:
    """As neox-train resolves it: the run's vocab_size, else the data's meta.json, else GPT-2's."""
    from pathlib import Path

    from neox_train.data.shards import read_meta
    from neox_train.model import GPT2_VOCAB_SIZE

    if run.vocab_size:
        return run.vocab_size
    meta = read_meta(run.data_dir) if Path(run.data_dir).is_dir() else None
    return int(meta["vocab_size"]) if meta and "vocab_size" in meta else GPT2_VOCAB_SIZE


def request_from_run(run, *, gpus: int, nodes: int, gpu_mem_gib: float | None, gpu_mem_source: str,
                     forced_stage: int | None = None, forced_offload: bool = False) -> PlanRequest:
    """Everything the planner needs, read from the run config and its DeepSpeed JSON."""
    from neox_train.ds_config import load_ds_config
    from neox_train.model import VOCAB_PAD_MULTIPLE, padded_vocab_size

    if forced_offload and forced_stage not in (2, 3):
        raise PlanError(f"--offload needs --zero 2 or 3 (the shipped offload variants are "
                        f"{', '.join(v.ds_name for v in OFFLOAD_VARIANTS)}), got --zero {forced_stage}")
    _, ds_cfg = load_ds_config(run.ds_config)
    configured = Variant.of_ds_config(ds_cfg)
    sections: dict[Variant, dict[str, Any]] = {}
    for variant in ALL_VARIANTS:
        _, shipped = load_ds_config(variant.ds_name)
        sections[variant] = shipped.get("zero_optimization", {"stage": variant.stage})
    # The run's own JSON speaks for its own variant (its bucket sizes, its offload device).
    sections[configured] = ds_cfg.get("zero_optimization", {"stage": configured.stage})
    micro, accum = configured_batch(run, ds_cfg, gpus)
    return PlanRequest(
        shape=model_shape(run.model, padded_vocab_size(tokenizer_vocab(run), getattr(run, "vocab_pad_multiple",
                                                                                     VOCAB_PAD_MULTIPLE)),
                          getattr(run, "attention", "sdpa")),
        seq_len=run.seq_len,
        micro_batch=micro, grad_accum=accum, precision=run_precision(run, ds_cfg), gpus=gpus, nodes=nodes,
        gpu_mem_gib=gpu_mem_gib, gpu_mem_source=gpu_mem_source, configured=configured,
        configured_checkpointing=run.activation_checkpointing, forced_stage=forced_stage,
        forced_offload=forced_offload, zero_sections=sections,
    )


def resolved_ds_config(base: dict[str, Any], plan: Plan, req: PlanRequest) -> dict[str, Any]:
    """The run's DeepSpeed JSON with the planned ZeRO section and batch: its optimizer, schedule and precision
    stay the user's; only zero_optimization comes from the shipped variant when the plan changed the stage."""
    import copy

    cfg = copy.deepcopy(base)
    cfg["zero_optimization"] = copy.deepcopy(req.zero_section(plan.variant))
    cfg["train_micro_batch_size_per_gpu"] = plan.micro_batch
    cfg["gradient_accumulation_steps"] = plan.grad_accum
    cfg["train_batch_size"] = plan.train_batch
    return cfg
