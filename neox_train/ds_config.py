"""DeepSpeed JSON: load as written, apply the run's few overrides, check the batch arithmetic before
DeepSpeed does.

The JSON stays in DeepSpeed's own schema. We check what DeepSpeed checks late or not at all (a batch
mismatch is an AssertionError deep inside `deepspeed.initialize`; "auto" is silently dropped inside
sections), so a bad config fails in a second with one line instead of after the model is built.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from neox_train.config import RunConfig
from neox_train.errors import ConfigError, read_json_object


def _shipped_config_dir() -> Path:
    """ds_configs/ of a source checkout (and editable install); inside the package for a wheel
    install."""
    repo = Path(__file__).resolve().parent.parent / "ds_configs"
    return repo if repo.is_dir() else Path(__file__).resolve().parent / "ds_configs"


DS_CONFIG_DIR = _shipped_config_dir()
ADAM_TYPES = ("adam", "adamw")
# DeepSpeed 0.19 raises on these sections; say so before it does.
REJECTED_SECTIONS = ("nebula", "elasticity")


def resolve_ds_config_path(name_or_path: str) -> Path:
    """`zero2` -> ds_configs/zero2.json; anything with a slash or .json suffix is a path."""
    path = Path(name_or_path)
    if path.suffix != ".json" and "/" not in name_or_path:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"DeepSpeed config {name_or_path!r}: no file {path} (shipped: {shipped}, "
                          "or give a path)")
    return path


def _find_auto(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{where}.{k}" if where else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{where}[{i}]")]
    return [where] if node == "auto" else []


def load_ds_config(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """Read and sanity-check a DeepSpeed JSON; returns (path, dict)."""
    path = resolve_ds_config_path(name_or_path)
    cfg = read_json_object(path, what="a DeepSpeed config: a JSON object in DeepSpeed's schema")
    problems = []
    autos = _find_auto(cfg)
    if autos:
        problems.append(
            f"'auto' at {', '.join(autos)} is a HuggingFace Trainer feature DeepSpeed does not "
            "resolve: give a number"
        )
    for section in REJECTED_SECTIONS:
        if section in cfg:
            problems.append(f"section '{section}' is not supported by DeepSpeed 0.19 (remove it)")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    if _enabled(cfg, "bf16") and _enabled(cfg, "fp16"):
        problems.append("bf16.enabled and fp16.enabled are both true: choose one")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            problems.append(f"{key}={v!r} must be a positive integer")
    if problems:
        raise ConfigError(f"DeepSpeed config {path}: " + "; ".join(problems))
    return path, cfg


def _enabled(cfg: dict[str, Any], section: str) -> bool:
    sec = cfg.get(section)
    return isinstance(sec, dict) and bool(sec.get("enabled", False))


def check_batch(
    *, dp_size: int, train_batch: int | None, micro_batch: int | None, grad_accum: int | None
) -> tuple[int, int, int]:
    """train_batch = micro_batch x grad_accum x dp_size: any two give the third; all three must
    agree.

    Pure, so the arithmetic is testable at world size 64 without processes. Returns (train, micro,
    accum).
    """
    if dp_size < 1:
        raise ConfigError(f"data-parallel size {dp_size} must be >= 1")
    if micro_batch is not None and grad_accum is not None:
        expected = micro_batch * grad_accum * dp_size
        if train_batch is not None and train_batch != expected:
            raise ConfigError(
                f"batch mismatch: train_batch_size={train_batch} but micro_batch {micro_batch} x "
                f"grad_accum {grad_accum} x data-parallel size {dp_size} = {expected}; fix one of "
                "them"
            )
        return expected, micro_batch, grad_accum
    if train_batch is None:
        raise ConfigError(
            "batch under-specified: give two of train_batch_size, train_micro_batch_size_per_gpu, "
            "gradient_accumulation_steps"
        )
    if micro_batch is not None:
        accum, rem = divmod(train_batch, micro_batch * dp_size)
        if rem or accum < 1:
            raise ConfigError(
                f"batch mismatch: train_batch_size={train_batch} is not a multiple of micro_batch "
                f"{micro_batch} x data-parallel size {dp_size} = {micro_batch * dp_size}"
            )
        return train_batch, micro_batch, accum
    if grad_accum is not None:
        micro, rem = divmod(train_batch, grad_accum * dp_size)
        if rem or micro < 1:
            raise ConfigError(
                f"batch mismatch: train_batch_size={train_batch} is not a multiple of grad_accum "
                f"{grad_accum} x data-parallel size {dp_size} = {grad_accum * dp_size}"
            )
        return train_batch, micro, grad_accum
    # Only train_batch_size: DeepSpeed assumes accumulation 1.
    return check_batch(dp_size=dp_size, train_batch=train_batch, micro_batch=None, grad_accum=1)


def resolve_batch(base: dict[str, Any], run: RunConfig, *,
                  dp_size: int) -> tuple[int, int, int, list[str]]:
    """(train batch, micro-batch, accumulation, notes) at dp_size ranks: the run config's
    micro-batch and accumulation over the JSON's; an override recomputes the global batch rather
    than failing on the JSON's."""
    notes: list[str] = []
    micro = (run.micro_batch if run.micro_batch is not None
             else base.get("train_micro_batch_size_per_gpu"))
    accum = (run.grad_accum if run.grad_accum is not None
             else base.get("gradient_accumulation_steps"))
    train_batch = base.get("train_batch_size")
    if (run.micro_batch is not None or run.grad_accum is not None) and train_batch is not None:
        notes.append(f"train_batch_size {train_batch} recomputed from the micro-batch/accumulation "
                     "overrides")
        train_batch = None
    train_batch, micro, accum = check_batch(dp_size=dp_size, train_batch=train_batch,
                                            micro_batch=micro, grad_accum=accum)
    return train_batch, micro, accum, notes


def run_precision(base: dict[str, Any], run: RunConfig) -> str:
    """bf16, fp16 or fp32: the run config's mixed_precision over the JSON's."""
    if run.mixed_precision is not None:
        return {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}[run.mixed_precision]
    return precision(base)


def effective_ds_config(
    base: dict[str, Any], run: RunConfig, *, dp_size: int, on_gpu: bool
) -> tuple[dict[str, Any], list[str]]:
    """The DeepSpeed dict this run hands to `deepspeed.initialize`, plus a human note per change
    made to `base`.

    Precedence: run config (already merged with the command line) over the JSON. The schedule length
    always follows the run's max_steps so the cosine reaches its floor at the last step.
    """
    cfg = copy.deepcopy(base)
    train_batch, micro, accum, notes = resolve_batch(cfg, run, dp_size=dp_size)
    cfg["train_batch_size"] = train_batch
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum

    if run.mixed_precision is not None:
        want_bf16 = run.mixed_precision == "bf16"
        want_fp16 = run.mixed_precision == "fp16"
        if want_bf16 != _enabled(cfg, "bf16") or want_fp16 != _enabled(cfg, "fp16"):
            notes.append(f"mixed precision set to {run.mixed_precision}")
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": want_bf16}
        fp16 = {**cfg.get("fp16", {}), "enabled": want_fp16}
        if not want_fp16 and set(fp16) == {"enabled"}:
            cfg.pop("fp16", None)
        else:
            cfg["fp16"] = fp16
    if _enabled(cfg, "fp16") and not on_gpu:
        raise ConfigError("mixed precision fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has "
                          "no fp16): use bf16 or no")

    sched = cfg.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("params"), dict):
        params = sched["params"]
        if "total_num_steps" in params and params["total_num_steps"] != run.max_steps:
            notes.append(f"scheduler total_num_steps {params['total_num_steps']} -> max_steps "
                         f"{run.max_steps}")
            params["total_num_steps"] = run.max_steps
        if run.warmup_steps is not None and "warmup_num_steps" in params:
            if params["warmup_num_steps"] != run.warmup_steps:
                notes.append(f"scheduler warmup_num_steps {params['warmup_num_steps']} -> "
                             f"{run.warmup_steps}")
            params["warmup_num_steps"] = run.warmup_steps
    if run.lr_schedule == "wsd":
        cfg["scheduler"] = wsd_config(cfg.get("scheduler"), run)
        notes.append(f"scheduler -> {WSD} (warmup {cfg['scheduler']['params']['warmup_num_steps']},"
                     f" decay {cfg['scheduler']['params']['decay_num_steps']} steps)")

    _choose_optimizer_impl(cfg, run.optimizer_impl, on_gpu=on_gpu, notes=notes)
    return cfg, notes


# The scheduler type of lr_schedule: wsd in the effective DeepSpeed config. DeepSpeed has no such
# type: build_engine takes it out and hands DeepSpeed the scheduler itself (train/schedule.py).
WSD = "WarmupStableDecay"


def wsd_config(cosine: dict[str, Any] | None, run: RunConfig) -> dict[str, Any]:
    """The scheduler entry of warmup-stable-decay, with the JSON's warmup and floor
    (WarmupCosineLR's warmup_num_steps, warmup_min_ratio, cos_min_ratio), decaying over the last
    decay_steps (default 20%). train/schedule.py builds the scheduler from it."""
    params = cosine.get("params", {}) if isinstance(cosine, dict) else {}
    decay = run.decay_steps if run.decay_steps is not None else max(1, run.max_steps // 5)
    return {"type": WSD, "params": {
        "warmup_num_steps": int(params.get("warmup_num_steps", run.warmup_steps or 0)),
        "warmup_min_ratio": float(params.get("warmup_min_ratio", 0.0)),
        "min_ratio": float(params.get("cos_min_ratio", 0.0)),
        "total_num_steps": run.max_steps, "decay_num_steps": decay}}


def _choose_optimizer_impl(cfg: dict[str, Any], impl: str | None, *, on_gpu: bool,
                           notes: list[str]) -> None:
    """Set the AdamW kernel in DeepSpeed's optimizer params (`torch_adam`, torch's `fused`).

    DeepSpeed's own FusedAdam is JIT-compiled at start: on a GPU that needs nvcc (absent from most
    pip-only machines), on CPU a ~50 s build. torch's AdamW is the same algorithm with no build, and
    its fused kernel (CUDA, and CPU since torch 2.4) needs none either, so it is the default;
    `optimizer_impl: deepspeed_fused` (or `"torch_adam": false` in the JSON) asks for FusedAdam.
    Optimizer offload always runs DeepSpeedCPUAdam.
    """
    opt = cfg.get("optimizer")
    offload = (isinstance(cfg.get("zero_optimization"), dict)
               and "offload_optimizer" in cfg["zero_optimization"])
    is_adam = isinstance(opt, dict) and str(opt.get("type", "")).lower() in ADAM_TYPES
    if impl is not None and (not is_adam or offload):
        why = ("the optimizer is offloaded (DeepSpeedCPUAdam)" if is_adam
               else "the DeepSpeed JSON's optimizer is not Adam/AdamW")
        raise ConfigError(f"optimizer_impl={impl!r} cannot apply: {why}; remove optimizer_impl or "
                          "change the JSON")
    if not is_adam or offload:
        return
    params = opt.setdefault("params", {})
    source = f"optimizer_impl={impl}"
    if impl is None:
        if "torch_adam" in params:
            return  # the JSON chose; keep it as written
        # Fused on CPU too: torch's fused CPU kernel halved the optimizer phase of the demo (README,
        # Performance).
        impl = "torch_fused"
        source = "the default; optimizer_impl chooses"
    before = {k: params.get(k) for k in ("torch_adam", "fused")}
    params.pop("fused", None)
    if impl == "deepspeed_fused":
        params["torch_adam"] = False
    else:
        params["torch_adam"] = True
        if impl == "torch_fused":
            params["fused"] = True
    after = {k: params.get(k) for k in ("torch_adam", "fused")}
    if after != before:
        kernel = {"torch": "torch AdamW",
                  "torch_fused": f"torch AdamW (fused {'CUDA' if on_gpu else 'CPU'} kernel)",
                  "deepspeed_fused": "DeepSpeed FusedAdam (JIT-built: needs nvcc on GPU)"}[impl]
        notes.append(f"optimizer uses {kernel} ({source})")


# What a DeepSpeed JSON says, read in one place: its ZeRO stage, its precision, what it offloads to
# CPU memory.
OFFLOAD_NONE = "none"
OFFLOAD_OPTIMIZER = "optimizer"
OFFLOAD_ALL = "optimizer+parameters"


def _zero_section(cfg: dict[str, Any]) -> dict[str, Any]:
    zero = cfg.get("zero_optimization")
    return zero if isinstance(zero, dict) else {}


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(_zero_section(cfg).get("stage", 0))


def precision(cfg: dict[str, Any]) -> str:
    """bf16, fp16 or fp32, as the JSON's bf16/fp16 sections say."""
    return "bf16" if _enabled(cfg, "bf16") else "fp16" if _enabled(cfg, "fp16") else "fp32"


def offload(cfg: dict[str, Any]) -> str:
    """OFFLOAD_NONE, OFFLOAD_OPTIMIZER or OFFLOAD_ALL (parameters imply the optimizer too)."""
    zero = _zero_section(cfg)
    if zero.get("offload_param"):
        return OFFLOAD_ALL
    return OFFLOAD_OPTIMIZER if zero.get("offload_optimizer") else OFFLOAD_NONE


def checkpoint_bytes(total_params: int, precision: str, zero_stage: int) -> int:
    """One DeepSpeed checkpoint, all ranks together: the module weights in the training dtype plus
    the optimizer states (fp32 master weights and two Adam moments, 12 bytes a parameter; bf16 at
    ZeRO-0 keeps two bf16 moments only, fp32 at ZeRO-0 two fp32 moments)."""
    weight_bytes = 4 if precision == "fp32" else 2
    if zero_stage == 0 and precision != "fp16":
        optimizer = 8 if precision == "fp32" else 4
    else:
        optimizer = 12
    return total_params * (weight_bytes + optimizer)


# Host memory an asynchronous save's snapshot may take, as a share of what is available when the run
# starts: the rest stays for the data loader, the upload worker and the page cache. Over it, saves
# are synchronous.
SNAPSHOT_MEMORY_SHARE = 0.8


def snapshot_bytes_per_node(total_params: int, precision: str, zero_stage: int, *, num_nodes: int,
                            world_size: int) -> int:
    """Host memory an asynchronous save's snapshot holds on the busiest node, the one with
    data-parallel rank 0.

    ZeRO-0 keeps every state on rank 0. ZeRO-1/2 write the module weights from rank 0 and split the
    optimizer states over the ranks. ZeRO-3 splits both."""
    total = checkpoint_bytes(total_params, precision, zero_stage)
    # the busiest node when they do not divide evenly
    ranks_per_node = -(-world_size // max(num_nodes, 1))
    share = min(ranks_per_node, world_size) / max(world_size, 1)
    if zero_stage == 0:
        return total
    if zero_stage == 3:
        return int(total * share)
    weights = total_params * (4 if precision == "fp32" else 2)
    return weights + int((total - weights) * share)
