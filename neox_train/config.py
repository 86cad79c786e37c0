"""The run config: what to train, on what data, for how long, where to write. Frozen once loaded.

DeepSpeed's own settings (ZeRO stage, precision, optimizer, schedule, batch) live in the DeepSpeed JSON named
by `ds_config`; the few run fields that overlap it (`micro_batch`, `grad_accum`, `mixed_precision`) are
optional overrides applied by `ds_config.effective_ds_config`, so there is exactly one place each value comes
from and the effective result is printed and saved with the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from neox_train.errors import ConfigError, read_json_object
from neox_train.model import ATTENTION_IMPLS, MODEL_PRESETS

PRECISIONS = ("bf16", "fp16", "no")
# torch: torch.optim.AdamW with torch's default kernel (for-each on CUDA); torch_fused: its fused kernel (CUDA and
# CPU, no build); deepspeed_fused: DeepSpeed's FusedAdam, JIT-compiled at start (nvcc on a GPU machine).
OPTIMIZER_IMPLS = ("torch", "torch_fused", "deepspeed_fused")


@dataclass(frozen=True)
class RunConfig:
    name: str = field(default="custom", metadata={"doc": "Label of this run config (preset name or file stem)."})
    model: str = field(default="neox-1.2b", metadata={"doc": "Model preset, one of neox_train.model.MODEL_PRESETS."})
    seq_len: int = field(default=2048, metadata={"doc": "Tokens per training sequence (<= the preset's max_seq_len)."})
    vocab_size: int | None = field(
        default=None,
        metadata={"doc": "Tokenizer vocabulary before padding to a multiple of 128; null = the data's meta.json, "
                         "else GPT-2's 50257."},
    )
    ds_config: str = field(
        default="zero2",
        metadata={"doc": "DeepSpeed JSON: a name in ds_configs/ (zero0..zero3, zero2_offload) or a path."},
    )
    micro_batch: int | None = field(default=None, metadata={"doc": "Sequences per GPU per micro-step; null = DeepSpeed JSON."})
    grad_accum: int | None = field(default=None, metadata={"doc": "Micro-steps per optimizer step; null = DeepSpeed JSON."})
    mixed_precision: str | None = field(default=None, metadata={"doc": "bf16, fp16 or no; null = DeepSpeed JSON."})
    max_steps: int = field(default=10000, metadata={"doc": "Optimizer steps to train (also the cosine schedule length)."})
    warmup_steps: int | None = field(default=None, metadata={"doc": "LR warmup steps; null = DeepSpeed JSON."})
    save_steps: int = field(default=500, metadata={"doc": "Save a checkpoint every this many optimizer steps (and at the end)."})
    log_steps: int = field(default=100, metadata={"doc": "Log loss, lr, grad norm and throughput every this many steps."})
    eval_steps: int = field(default=500, metadata={"doc": "Evaluate on the held-out split every this many steps; 0 = never."})
    eval_batches: int = field(default=20, metadata={"doc": "Micro-batches per rank in one evaluation."})
    keep_last_n: int = field(default=3, metadata={"doc": "Local checkpoints kept; older ones are deleted; 0 = keep all."})
    val_fraction: float = field(default=0.01, metadata={"doc": "Fraction of windows held out for validation, in [0, 0.5]."})
    max_shards: int | None = field(default=None, metadata={"doc": "Use only the first N shards (sorted); null = all."})
    activation_checkpointing: bool = field(
        default=False, metadata={"doc": "Recompute activations in backward: less memory, ~33% more compute."}
    )
    attention: str = field(
        default="sdpa",
        metadata={"doc": "Attention kernel: sdpa (torch scaled_dot_product_attention, FlashAttention on CUDA in bf16/fp16) "
                         "or eager (transformers' matmul-softmax-matmul, for comparison)."},
    )
    vocab_pad_multiple: int = field(
        default=128,
        metadata={"doc": "Pad the embedding and output layer to a multiple of this many tokens (tensor-core friendly "
                         "logits matmul; 50257 -> 50304); 1 = no padding. Part of the model shape."},
    )
    optimizer_impl: str | None = field(
        default=None,
        metadata={"doc": "AdamW kernel: torch (for-each), torch_fused (fused CUDA/CPU kernel, no build) or deepspeed_fused "
                         "(DeepSpeed FusedAdam, JIT-built with nvcc on GPU); null = torch_fused unless the JSON sets "
                         "torch_adam."},
    )
    compile: str | None = field(
        default=None,
        metadata={"doc": "torch.compile backend for the model through engine.compile(): inductor (fast kernels; minutes "
                         "to compile), aot_eager/eager (debugging); null = no compilation."},
    )
    prefetch_micro_batches: int = field(
        default=2,
        metadata={"doc": "Micro-batches assembled ahead by a background thread (pinned memory and non-blocking "
                         "copies on CUDA); 0 = assemble each one in the loop."},
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"doc": "Peak TFLOP/s per device that MFU divides by; null = the built-in table for known GPUs in "
                         "bf16/fp16 (MFU is null on CPU and unknown devices)."},
    )
    init_from_hf: str | None = field(
        default=None,
        metadata={"doc": "Start from the weights of a HuggingFace GPTNeoX folder (continued pretraining); its shape must "
                         "match `model` and the padded vocabulary. Ignored when resuming (the checkpoint wins)."},
    )
    seed: int = field(default=1234, metadata={"doc": "Seeds model init and the data order."})
    data_dir: str = field(default="data/training", metadata={"doc": "Folder of token shards (.npy/.npz, nested)."})
    save_dir: str = field(default="checkpoints", metadata={"doc": "Folder for DeepSpeed checkpoints (tags global_stepN)."})
    log_dir: str = field(default="logs", metadata={"doc": "Folder for training.log, metrics.jsonl and TensorBoard events."})
    sync_to: str | None = field(
        default=None,
        metadata={"doc": "Where checkpoints are published: gs://bucket/prefix, file:///path or a local folder; null = nowhere."},
    )
    credentials: str | None = field(
        default=None,
        metadata={"doc": "Service-account JSON for gs://; null = GOOGLE_APPLICATION_CREDENTIALS or application default."},
    )
    background_upload: bool = field(
        default=True,
        metadata={"doc": "Upload in a background process (true) or inside save, blocking the loop (false: debugging)."},
    )
    upload_timeout_s: float = field(
        default=1800.0, metadata={"doc": "At exit, wait at most this long for pending uploads before giving up (non-zero exit)."}
    )
    max_unpublished_checkpoints: int = field(
        default=5,
        metadata={"doc": "Stop training (exit 1, checkpoints kept locally) once more than this many checkpoints could "
                         "not be published (given up, or still waiting), so a bucket that refuses every upload does "
                         "not fill the disk for days; 0 = never stop."},
    )
    max_pending_uploads: int = field(
        default=0,
        metadata={"doc": "If more checkpoints than this wait for upload, skip the superseded ones (kept locally); 0 = never skip."},
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with `changes` (command-line overrides); the original is never mutated."""
        return from_dict({**self.to_dict(), **changes})


# The seed system's config names, kept so users' habits carry over.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    # Quick validation of the real pipeline on a GPU: small model, few shards, frequent saves.
    "test": dict(
        name="test", model="neox-160m", seq_len=512, ds_config="zero2", micro_batch=2, grad_accum=2,
        mixed_precision="bf16", max_steps=1000, save_steps=200, log_steps=25, eval_steps=200, max_shards=5,
    ),
    # The flagship run: neox-1.2b, effective batch 16 sequences per GPU (4 x 4).
    "production": dict(
        name="production", model="neox-1.2b", seq_len=2048, ds_config="zero2", micro_batch=4, grad_accum=4,
        mixed_precision="bf16", max_steps=10000, save_steps=500, log_steps=100, eval_steps=500,
    ),
    # The README demo: trains on 2 CPU cores in a few minutes on the Python docs corpus.
    "demo": dict(
        name="demo", model="neox-demo", seq_len=128, ds_config="zero0", micro_batch=8, grad_accum=2,
        mixed_precision="no", max_steps=300, warmup_steps=30, save_steps=100, log_steps=10, eval_steps=50,
        eval_batches=8, keep_last_n=2, val_fraction=0.05, data_dir="data/demo", save_dir="checkpoints/demo",
        log_dir="logs/demo", sync_to="bucket/demo",
    ),
}

_FIELD_NAMES = [f.name for f in fields(RunConfig)]


def field_docs() -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in fields(RunConfig)}


def _type_name(value: Any) -> str:
    return type(value).__name__


def validate(values: dict[str, Any]) -> list[str]:
    """Every problem with `values`, each naming the field, the value and what is valid (empty list: fine)."""
    problems: list[str] = []
    unknown = sorted(set(values) - set(_FIELD_NAMES))
    for key in unknown:
        problems.append(f"unknown field '{key}' (valid fields: {', '.join(_FIELD_NAMES)})")

    def check_int(name: str, lo: int, optional: bool = False) -> None:
        v = values.get(name)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"{name}={v!r} must be an integer >= {lo}" + (" or null" if optional else ""))
        elif v < lo:
            problems.append(f"{name}={v} is out of range: must be >= {lo}")

    for name in ("seq_len", "max_steps", "save_steps", "log_steps", "eval_batches"):
        check_int(name, 1)
    for name in ("eval_steps", "keep_last_n", "seed", "max_pending_uploads", "max_unpublished_checkpoints"):
        check_int(name, 0)
    for name in ("micro_batch", "grad_accum", "max_shards"):
        check_int(name, 1, optional=True)
    check_int("vocab_pad_multiple", 1)
    check_int("prefetch_micro_batches", 0)
    check_int("warmup_steps", 1, optional=True)  # DeepSpeed requires a positive warmup
    check_int("vocab_size", 2, optional=True)

    model = values.get("model")
    if model not in MODEL_PRESETS:
        problems.append(f"model={model!r} is not a preset (valid: {', '.join(MODEL_PRESETS)})")
    else:
        seq = values.get("seq_len")
        max_seq = MODEL_PRESETS[model].max_seq_len
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > max_seq:
            problems.append(f"seq_len={seq} exceeds {model}'s max_seq_len {max_seq}")
    mp = values.get("mixed_precision")
    if mp is not None and mp not in PRECISIONS:
        problems.append(f"mixed_precision={mp!r} is not valid (valid: {', '.join(PRECISIONS)} or null)")
    attention = values.get("attention")
    if attention not in ATTENTION_IMPLS:
        problems.append(f"attention={attention!r} is not valid (valid: {', '.join(ATTENTION_IMPLS)})")
    impl = values.get("optimizer_impl")
    if impl is not None and impl not in OPTIMIZER_IMPLS:
        problems.append(f"optimizer_impl={impl!r} is not valid (valid: {', '.join(OPTIMIZER_IMPLS)} or null)")
    peak = values.get("peak_tflops")
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or not peak > 0):
        problems.append(f"peak_tflops={peak!r} must be a number of TFLOP/s > 0 or null")
    vf = values.get("val_fraction")
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf <= 0.5:
        problems.append(f"val_fraction={vf!r} is out of range: must be a number in [0, 0.5]")
    for name in ("activation_checkpointing", "background_upload"):
        if not isinstance(values.get(name), bool):
            problems.append(f"{name}={values.get(name)!r} must be true or false")
    ut = values.get("upload_timeout_s")
    if isinstance(ut, bool) or not isinstance(ut, (int, float)) or ut < 0:
        problems.append(f"upload_timeout_s={ut!r} must be a number of seconds >= 0")
    for name in ("sync_to", "credentials", "init_from_hf", "compile"):
        v = values.get(name)
        if v is not None and (not isinstance(v, str) or not v):
            problems.append(f"{name}={v!r} must be a non-empty string or null")
    for name in ("name", "ds_config", "data_dir", "save_dir", "log_dir"):
        v = values.get(name)
        if not isinstance(v, str) or not v:
            problems.append(f"{name}={v!r} must be a non-empty string (got {_type_name(v)})")
    return problems


def from_dict(values: dict[str, Any], *, source: str = "run config") -> RunConfig:
    """Build a RunConfig, raising ConfigError listing every bad field at once."""
    merged = {**RunConfig().to_dict(), **values}
    problems = validate(merged)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    for name in ("val_fraction", "upload_timeout_s", "peak_tflops"):
        if isinstance(merged[name], int) and not isinstance(merged[name], bool):
            merged[name] = float(merged[name])
    return RunConfig(**merged)


def load_run_config(name_or_file: str) -> RunConfig:
    """A preset name (test, production, demo) or a JSON file of RunConfig fields.

    A file may start from a preset with "base": "production"; its other keys override that preset.
    """
    if name_or_file in RUN_PRESETS:
        return from_dict(RUN_PRESETS[name_or_file], source=f"preset '{name_or_file}'")
    path = Path(name_or_file)
    if not path.suffix == ".json" and not path.exists():
        raise ConfigError(
            f"--config {name_or_file!r} is neither a preset ({', '.join(RUN_PRESETS)}) nor an existing JSON file"
        )
    values = read_json_object(path, what=f"a JSON object of run-config fields, or a preset: {', '.join(RUN_PRESETS)}")
    base = values.pop("base", None)
    if base is not None and base not in RUN_PRESETS:
        raise ConfigError(f"config file {path}: base={base!r} is not a preset (valid: {', '.join(RUN_PRESETS)})")
    start = dict(RUN_PRESETS[base]) if base else {}
    start["name"] = path.stem
    return from_dict({**start, **values}, source=f"config file {path}")
