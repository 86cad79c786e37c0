"""The choice of ZeRO stage, offload, activation checkpointing and micro-batch that fits the GPUs
(launch.memory holds the estimate itself).

The choice goes cheapest-communication first: the lowest ZeRO stage that fits with headroom, else
optimizer (then parameter) offload, at the configured micro-batch, else at a lower one (gradient
accumulation raised so micro x accumulation, and so the global batch, stays as configured); only
when nothing fits without activation checkpointing at any micro-batch is it turned on. Pure
functions of numbers, so a 64-GPU table costs nothing and is testable on a laptop.

Units: "GB" in names and output means GiB (2**30 bytes), the unit torch and nvidia-smi report GPU
memory in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from neox_train.data.shards import resolve_vocab
from neox_train.ds_config import load_ds_config, resolve_batch, run_precision
from neox_train.errors import ConfigError
from neox_train.launch.memory import (
    ALL_VARIANTS,
    HEADROOM_FRACTION,
    OFFLOAD_VARIANTS,
    RESERVED_GIB,
    Estimate,
    ModelShape,
    Variant,
    estimate,
    gb,
    ladder,
    model_shape,
    usable_bytes,
)
from neox_train.model import padded_vocab_size
from neox_train.units import GIB

# GPUs per node assumed where no hostfile says otherwise (the planner table for 16 and 64 GPUs).
DEFAULT_GPUS_PER_NODE = 8


class PlanError(ConfigError):
    """No variant fits (or a request the planner cannot serve); str(err) is one line with the
    numbers."""


# -- the choice ------------------------------------------------------------------------------------
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
    # zero_optimization section per variant (the run's own for its variant, the shipped JSON's for
    # the others)
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
        usable = None if self.gpu_mem_gib is None else gb(usable_bytes(self.gpu_mem_gib))
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
            "est_gb_per_gpu": gb(self.chosen.total),
            "est_breakdown_gb": self.chosen.breakdown_gb(),
            "est_cpu_gb_per_node": gb(self.chosen.cpu_per_node),
            "est_cpu_breakdown_gb": {
                "model_states": gb(self.chosen.cpu_per_node - self.chosen.snapshot_per_node),
                "checkpoint_snapshot": gb(self.chosen.snapshot_per_node)},
            "gpu_mem_gb": self.gpu_mem_gib,
            "gpu_mem_source": self.gpu_mem_source,
            "usable_gb_per_gpu": usable,
            "fits": self.fits,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "model": {"preset": self.shape.name, "params": self.shape.total_params,
                      "largest_layer_params": self.shape.largest_layer_params,
                      "seq_len": self.seq_len, "vocab_size": self.shape.vocab_size},
            "considered": [
                {"ds_config": e.variant.ds_name, "zero_stage": e.variant.stage,
                 "offload": e.variant.offload,
                 "activation_checkpointing": e.activation_checkpointing,
                 "micro_batch": e.micro_batch, "est_gb_per_gpu": gb(e.total),
                 "fits": (None if self.gpu_mem_gib is None
                          else e.total <= usable_bytes(self.gpu_mem_gib))}
                for e in self.considered
            ],
            "headroom": {"reserved_gb": RESERVED_GIB, "fraction": HEADROOM_FRACTION},
        }


def micro_batch_candidates(micro_batch: int) -> list[int]:
    """The configured micro-batch, then its divisors downwards: each keeps micro x accumulation
    unchanged."""
    return [m for m in range(micro_batch, 0, -1) if micro_batch % m == 0]


def choose(req: PlanRequest) -> Plan:
    """The plan for `req`: see the module docstring for the order of preference."""
    per_gpu = req.micro_batch * req.grad_accum

    def est(variant: Variant, ac: bool, micro: int) -> Estimate:
        return estimate(variant, req.shape, zero_section=req.zero_section(variant),
                        seq_len=req.seq_len, micro_batch=micro, grad_accum=per_gpu // micro,
                        precision=req.precision, gpus=req.gpus, nodes=req.nodes, checkpointing=ac)

    def plan(e: Estimate, fits: bool | None, reason: str, considered: list[Estimate],
             warnings=()) -> Plan:
        return Plan(variant=e.variant, activation_checkpointing=e.activation_checkpointing,
                    micro_batch=e.micro_batch, grad_accum=e.grad_accum,
                    train_batch=e.micro_batch * e.grad_accum * req.gpus, gpus=req.gpus,
                    nodes=req.nodes, precision=req.precision, chosen=e, fits=fits,
                    gpu_mem_gib=req.gpu_mem_gib, gpu_mem_source=req.gpu_mem_source, reason=reason,
                    considered=tuple(considered), shape=req.shape, seq_len=req.seq_len,
                    warnings=tuple(warnings))

    forced = (None if req.forced_stage is None
              else ladder(req.precision, req.forced_stage, req.forced_offload)[0])
    if req.gpu_mem_gib is None:
        variant = forced or req.configured
        e = est(variant, req.configured_checkpointing, req.micro_batch)
        why = "forced by --zero" if forced else "as the DeepSpeed JSON says"
        return plan(e, None, f"GPU memory unknown ({req.gpu_mem_source}): {variant.label} {why}, "
                             "micro-batch and accumulation as configured, nothing checked against "
                             "a memory limit", [e])

    usable = usable_bytes(req.gpu_mem_gib)
    variants = ladder(req.precision, req.forced_stage, req.forced_offload)
    ac_options = [True] if req.configured_checkpointing else [False, True]
    considered: list[Estimate] = []
    # Without activation checkpointing first, at any micro-batch: recomputing every layer costs a
    # third more compute, a smaller micro-batch (the same global batch) far less.
    for ac in ac_options:
        for micro in micro_batch_candidates(req.micro_batch):
            for variant in variants:
                e = est(variant, ac, micro)
                considered.append(e)
                if e.total <= usable:
                    return plan(e, True, _fit_reason(e, considered, req, usable), considered)
    smallest = min(considered, key=lambda e: e.total)
    hardware = (f"{req.gpus} GPU{'s' if req.gpus > 1 else ''} of {req.gpu_mem_gib:g} GiB "
                f"(usable {gb(usable)} GiB each)")
    if forced is not None:
        e = est(forced, req.configured_checkpointing, req.micro_batch)
        warning = (f"--zero {forced.stage}{' --offload' if req.forced_offload else ''} will not "
                   f"fit {hardware}: {e.label} needs {gb(e.total)} GiB per GPU ({_breakdown(e)}); "
                   f"the smallest option with it, {smallest.label}, needs {gb(smallest.total)} GiB")
        return plan(e, False, f"{forced.label} forced by --zero", considered, [warning])
    raise PlanError(
        f"{req.shape.name} ({req.shape.total_params:,} parameters, seq_len {req.seq_len}, "
        f"{req.precision}) does not fit {hardware}: the smallest option, {smallest.label}, needs "
        f"{gb(smallest.total)} GiB per GPU ({_breakdown(smallest)}); use more GPUs, GPUs with more "
        f"memory, a shorter --seq-len, or smaller reduce_bucket_size in the DeepSpeed JSON"
    )


def _breakdown(e: Estimate) -> str:
    b = e.breakdown_gb()
    loss = (f"loss {b['logits']} GiB (chunks of {e.loss_chunk} tokens)" if e.loss_chunk
            else f"logits {b['logits']} GiB")
    return (f"model states {b['model_states']}, buffers {b['comm_buffers']}, activations "
            f"{b['activations']}, {loss}")


def _fit_reason(chosen: Estimate, considered: list[Estimate], req: PlanRequest,
                usable: float) -> str:
    hw = f"{req.gpus} x {req.gpu_mem_gib:g} GiB"
    text = (f"{chosen.label} fits {hw}: {gb(chosen.total)} of {gb(usable)} usable GiB per GPU "
            f"({_breakdown(chosen)})")
    rejected = [e for e in considered if e is not chosen]
    if rejected:
        shown = "; ".join(f"{e.label} {gb(e.total)}" for e in rejected[:8])
        more = f" and {len(rejected) - 8} more" if len(rejected) > 8 else ""
        text += f". Did not fit (GiB per GPU): {shown}{more}"
    if not chosen.activation_checkpointing:
        text += ". No activation checkpointing: the plan fits without it"
    elif not req.configured_checkpointing:
        text += (". Activation checkpointing: nothing fits without it, at any micro-batch down "
                 "to 1")
    if chosen.micro_batch != req.micro_batch:
        text += (f". Micro-batch lowered {req.micro_batch} -> {chosen.micro_batch}, accumulation "
                 f"raised {req.grad_accum} -> {chosen.grad_accum}: the same "
                 f"{req.micro_batch * req.grad_accum} sequences per GPU per step")
    return text


def plan_table(make_request, gpu_counts: list[int], mem_sizes: list[float]) -> list[dict[str, Any]]:
    """One plan per (GPU count, memory size): `make_request(gpus, nodes, mem_gib)` builds each
    request.

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
    head = ("| GPUs | GPU memory | ZeRO | offload | act. ckpt | micro x accum | global batch | "
            "est. GiB/GPU (states + buffers + activations + loss) | usable GiB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['gpu_mem_gb']:g} GB | does not fit | | | | | | |")
            continue
        b = r["est_breakdown_gb"]
        lines.append(
            f"| {r['gpus']} | {r['gpu_mem_gb']:g} GB | {r['zero_stage']} | {r['offload']} | "
            f"{'yes' if r['activation_checkpointing'] else 'no'} | {r['micro_batch']} x "
            f"{r['grad_accum']} | {r['train_batch']} | {r['est_gb_per_gpu']:.1f} "
            f"({b['model_states']:.1f} + {b['comm_buffers']:.1f} + {b['activations']:.1f} + "
            f"{b['logits']:.1f}) | {r['usable_gb_per_gpu']:.1f} |"
        )
    return "\n".join(lines)


# -- from a run config -----------------------------------------------------------------------------
def detect_gpu_memory() -> tuple[float | None, str]:
    """(GiB of the smallest visible GPU, where the number came from); (None, why) without CUDA."""
    import torch  # deferred (~1.3 s): neox-launch --help and flag errors answer before torch loads

    if not torch.cuda.is_available():
        return None, "no CUDA device and no --gpu-mem-gb"
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    smallest = min(props, key=lambda p: p.total_memory)
    # The smallest card bounds every rank; other nodes are assumed to hold the same GPUs.
    return round(smallest.total_memory / GIB, 2), f"read from cuda ({len(props)} x {smallest.name})"


def request_from_run(run, *, gpus: int, nodes: int, gpu_mem_gib: float | None, gpu_mem_source: str,
                     forced_stage: int | None = None, forced_offload: bool = False) -> PlanRequest:
    """Everything the planner needs, read from the run config and its DeepSpeed JSON."""

    if forced_offload and forced_stage not in (2, 3):
        raise PlanError(f"--offload needs --zero 2 or 3 (the shipped offload variants are "
                        f"{', '.join(v.ds_name for v in OFFLOAD_VARIANTS)}), got --zero "
                        f"{forced_stage}")
    _, ds_cfg = load_ds_config(run.ds_config)
    configured = Variant.of_ds_config(ds_cfg)
    sections: dict[Variant, dict[str, Any]] = {}
    for variant in ALL_VARIANTS:
        _, shipped = load_ds_config(variant.ds_name)
        sections[variant] = shipped.get("zero_optimization", {"stage": variant.stage})
    # The run's own JSON speaks for its own variant (its bucket sizes, its offload device).
    sections[configured] = ds_cfg.get("zero_optimization", {"stage": configured.stage})
    _, micro, accum, _ = resolve_batch(ds_cfg, run, dp_size=gpus)  # as neox-train resolves them
    return PlanRequest(
        shape=model_shape(run.model,
                          padded_vocab_size(resolve_vocab(run.vocab_size, run.data_paths()[0])[0],
                                            run.vocab_pad_multiple), run.attention,
                          run.loss_chunk),
        seq_len=run.seq_len,
        micro_batch=micro, grad_accum=accum, precision=run_precision(ds_cfg, run), gpus=gpus,
        nodes=nodes, gpu_mem_gib=gpu_mem_gib, gpu_mem_source=gpu_mem_source, configured=configured,
        configured_checkpointing=run.activation_checkpointing, forced_stage=forced_stage,
        forced_offload=forced_offload, zero_sections=sections,
    )


def resolved_ds_config(base: dict[str, Any], plan: Plan, req: PlanRequest) -> dict[str, Any]:
    """The run's DeepSpeed JSON with the planned ZeRO section and batch: its optimizer, schedule and
    precision stay the user's; only zero_optimization comes from the shipped variant when the plan
    changed the stage."""

    cfg = copy.deepcopy(base)
    cfg["zero_optimization"] = copy.deepcopy(req.zero_section(plan.variant))
    cfg["train_micro_batch_size_per_gpu"] = plan.micro_batch
    cfg["gradient_accumulation_steps"] = plan.grad_accum
    cfg["train_batch_size"] = plan.train_batch
    return cfg
