"""The run config: what to train, on what data, for how long, where to write. Frozen once loaded.

DeepSpeed's own settings (ZeRO stage, precision, optimizer, schedule, batch) live in the DeepSpeed
JSON named by `ds_config`; the few run fields that overlap it (`micro_batch`, `grad_accum`,
`mixed_precision`) are optional overrides applied by `ds_config.effective_ds_config`, so there is
exactly one place each value comes from and the effective result is printed and saved with the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from neox_train.config_rules import (
    is_int,
    mixture_problems,
    model_problems,
    number_problems,
    profile_span,
    tracker_names,
    tracker_problems,
)
from neox_train.errors import ConfigError, read_json_object
from neox_train.model import ATTENTION_IMPLS
from neox_train.run_presets import RUN_PRESETS

PRECISIONS = ("bf16", "fp16", "no")
# --resume auto: latest where a complete checkpoint exists (here or at sync_to), else step 0 (the
# supervisor's)
RESUME_AUTO = "auto"
# torch: torch.optim.AdamW with torch's default kernel (for-each on CUDA); torch_fused: its fused
# kernel (CUDA and CPU, no build); deepspeed_fused: DeepSpeed's FusedAdam, JIT-compiled at start
# (nvcc on a GPU machine).
OPTIMIZER_IMPLS = ("torch", "torch_fused", "deepspeed_fused")
LR_SCHEDULES = ("cosine", "wsd")
# The stream budget of one process's transfers to and from a bucket (files, their parts and slices
# together): a cloud VM's NIC needs 16-32 streams before it is full (docs/checkpoints.md).
DEFAULT_TRANSFER_STREAMS = 16
MAX_TRANSFER_STREAMS = 256


def _f(default: Any, doc: str, **flag: Any) -> Any:
    """A run-config field and its documentation, which field_docs() and neox-train's --help quote.

    neox-train's flag for a field comes from the field (neox_train/flags.py): `--field-name`, its
    type and default, the doc as its help. `flag` holds only what that rule cannot know: flag="--x"
    renames it, flag=None makes the field no flag; metavar, choices (also what validate() accepts),
    nargs and const as argparse takes them; group, the --help section ("performance",
    "self-healing"); both=True gives a bool both --x and --no-x.
    """
    return field(default=default, metadata={"doc": doc, **flag})


_PERF, _HEAL = {"group": "performance"}, {"group": "self-healing"}


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("custom", "Label of this run config (preset name or file stem).", flag=None)
    model: str = _f("neox-1.2b", "Model preset, one of neox_train.model.MODEL_PRESETS.")
    seq_len: int = _f(2048, "Tokens per training sequence (<= the preset's max_seq_len).")
    vocab_size: int | None = _f(
        None, "Tokenizer vocabulary before padding to a multiple of 128; null = the data's "
        "meta.json, else GPT-2's 50257.")
    ds_config: str = _f(
        "zero2", "DeepSpeed JSON: a name in ds_configs/ (zero0..zero3, zero2_offload) or a path.")
    micro_batch: int | None = _f(None, "Sequences per GPU per micro-step; null = DeepSpeed JSON.")
    grad_accum: int | None = _f(None, "Micro-steps per optimizer step; null = DeepSpeed JSON.")
    mixed_precision: str | None = _f(
        None, "bf16, fp16 or no; null = DeepSpeed JSON.", choices=PRECISIONS)
    max_steps: int = _f(10000, "Optimizer steps to train (also the cosine schedule length).")
    warmup_steps: int | None = _f(None, "LR warmup steps; null = DeepSpeed JSON.")
    lr_schedule: str = _f(
        "cosine", "After the warmup: cosine (the DeepSpeed JSON's WarmupCosineLR, down to its "
        "floor at max_steps) or wsd (warmup-stable-decay: the peak LR until the last decay_steps, "
        "then linear to the same floor).", choices=LR_SCHEDULES)
    decay_steps: int | None = _f(
        None, "wsd: steps of the final decay; null = 20% of max_steps. To decay a branch from a "
        "stable-phase checkpoint at step S: --resume it with --max-steps S+N --decay-steps N.")
    save_steps: int = _f(500, "Save a checkpoint every this many optimizer steps (and at the end).")
    log_steps: int = _f(100, "Log loss, lr, grad norm and throughput every this many steps.")
    eval_steps: int = _f(500, "Evaluate on the held-out split every this many steps; 0 = never.")
    eval_batches: int = _f(20, "Micro-batches per rank in one evaluation.")
    keep_last_n: int = _f(3, "Local checkpoints kept; older ones are deleted; 0 = keep all.")
    val_fraction: float = _f(0.01, "Fraction of windows held out for validation, in [0, 0.5].")
    max_shards: int | None = _f(None, "Use only the first N shards (sorted); null = all.")
    activation_checkpointing: bool = _f(
        False, "Recompute activations in backward: less memory, ~33% more compute.")
    attention: str = _f(
        "sdpa", "Attention kernel: sdpa (torch scaled_dot_product_attention, FlashAttention on "
        "CUDA in bf16/fp16), eager (transformers' matmul-softmax-matmul, for comparison) or "
        "flex_attention (CUDA only: with document_masking, block-causal without a dense mask).",
        choices=ATTENTION_IMPLS, **_PERF)
    vocab_pad_multiple: int = _f(
        128, "Pad the embedding and output layer to a multiple of this many tokens (tensor-core "
        "friendly logits matmul; 50257 -> 50304); 1 = no padding. Part of the model shape.",
        metavar="N", **_PERF)
    optimizer_impl: str | None = _f(
        None, "AdamW kernel: torch (for-each), torch_fused (fused CUDA/CPU kernel, no build) or "
        "deepspeed_fused (DeepSpeed FusedAdam, JIT-built with nvcc on GPU); null = torch_fused "
        "unless the JSON sets torch_adam.", choices=OPTIMIZER_IMPLS, **_PERF)
    compile: str | None = _f(
        None, "torch.compile backend for the model through engine.compile(): inductor (fast "
        "kernels; minutes to compile), aot_eager/eager (debugging); null = no compilation.",
        nargs="?", const="inductor", metavar="BACKEND", **_PERF)
    prefetch_micro_batches: int = _f(
        2, "Micro-batches assembled ahead by a background thread (pinned memory and non-blocking "
        "copies on CUDA); 0 = assemble each one in the loop.",
        flag="--prefetch", metavar="N", **_PERF)
    peak_tflops: float | None = _f(
        None, "Peak TFLOP/s per device that MFU divides by; null = the built-in table for known "
        "GPUs in bf16/fp16 (MFU is null on CPU and unknown devices).", metavar="TFLOPS", **_PERF)
    profile_steps: str | None = _f(
        None, "Record a torch.profiler trace of steps A to B (e.g. 5-7) on every rank, into "
        "LOG_DIR/profile/: a Chrome trace and the TensorBoard profiler plugin's files.",
        metavar="A-B", **_PERF)
    memory_snapshot: int | None = _f(
        None, "CUDA: record the allocator's history from the start and write a snapshot for "
        "pytorch.org/memory_viz at this step, and on an out-of-memory error before exiting, into "
        "LOG_DIR/profile/.", metavar="STEP", **_PERF)
    document_masking: bool = _f(
        False, "Attend only within each document of a packed window (block-causal, by the EOS "
        "between documents), with positions restarting at each document, and do not score the "
        "token after an EOS. Off by default: GPT-NeoX and Pythia trained across documents, and the "
        "mask costs SDPA's flash kernel on GPU (docs/training.md).", both=True, **_PERF)
    loss_chunk: int = _f(
        1024, "Tokens per chunk of the loss: the output layer and the cross-entropy run a chunk "
        "at a time, in forward and again in backward, so the [tokens, vocab] logits are never "
        "held whole (5 GB at micro-batch 4, seq 2048, vocab 50304); 0 = the whole logits, then the "
        "cross-entropy.", metavar="N", **_PERF)
    init_from_hf: str | None = _f(
        None, "Start from the weights of a HuggingFace GPTNeoX folder (continued pretraining); its "
        "shape must match `model` and the padded vocabulary. Ignored when resuming (the checkpoint "
        "wins).", metavar="DIR")
    seed: int = _f(1234, "Seeds model init and the data order.")
    data_dir: str = _f(
        "data/training", "Folder of token shards (.npy/.npz, nested) and/or gpt-neox/Megatron "
        "indexed datasets (PREFIX.bin + .idx), or one indexed PREFIX.")
    data: list[dict[str, Any]] | None = _f(
        None, "A weighted mixture instead of data_dir: [{\"path\": ..., \"weight\": ..., \"name\": "
        "optional}, ...]. A weight is the share of training samples drawn from that dataset.",
        flag=None)
    allow_data_change: bool = _f(
        False, "Resume although `data` (the mixture's paths or weights) differs from the "
        "checkpoint's: the data position then continues in the new mixture.")
    save_dir: str = _f("checkpoints", "Folder for DeepSpeed checkpoints (tags global_stepN).")
    log_dir: str = _f("logs", "Folder for training.log, metrics.jsonl and TensorBoard events.")
    report_to: str = _f(
        "tensorboard", "Where rank 0 reports metrics and the run's configs besides metrics.jsonl: "
        "a comma-separated list of tensorboard, wandb, mlflow, or none. W&B follows its WANDB_* "
        "variables (WANDB_MODE=offline, WANDB_ENTITY); MLflow MLFLOW_TRACKING_URI (default "
        "sqlite:///LOG_DIR/mlflow.db). A resume continues the same tracker run (docs/tracking.md).",
        metavar="LIST")
    tracker_project: str = _f(
        "neox-train", "The W&B project and MLflow experiment runs are logged to.", metavar="NAME")
    sync_to: str | None = _f(
        None, "Where checkpoints are published: gs://bucket/prefix, file:///path or a local "
        "folder; null = nowhere.", metavar="URL")
    credentials: str | None = _f(
        None, "Service-account JSON for gs://; null = GOOGLE_APPLICATION_CREDENTIALS or "
        "application default.", metavar="FILE")
    background_upload: bool = _f(
        True, "Upload in a background process (true) or inside save, blocking the loop (false: "
        "debugging).")
    upload_timeout_s: float = _f(
        1800.0, "At exit, wait at most this long for pending uploads before giving up (non-zero "
        "exit).")
    max_unpublished_checkpoints: int = _f(
        5, "Stop training (exit 1, checkpoints kept locally) once more than this many checkpoints "
        "could not be published (given up, or waiting while every attempt fails), so a bucket that "
        "refuses every upload does not fill the disk for days; 0 = never stop.")
    unreachable_warning_s: float = _f(
        30.0, "Seconds the storage endpoint may fail every request (refused, timed out, 5xx) "
        "before one WARNING names it and the unpublished checkpoints; from then on those count "
        "toward max_unpublished_checkpoints.")
    transfer_streams: int = _f(
        DEFAULT_TRANSFER_STREAMS, "Concurrent streams to and from the bucket, across files and "
        "the parts of large files (parallel uploads, sliced downloads), per process; 1 = one "
        f"stream at a time. At most {MAX_TRANSFER_STREAMS}.", metavar="N")
    parallel_uploads: bool = _f(
        True, "Send files of 32 MiB and more to gs:// in parts on parallel streams, composed in "
        "the bucket (false: one stream per file; parts with soft delete on are billed for its "
        "window, see docs/checkpoints.md).", both=True)
    async_save: bool = _f(
        True, "Save checkpoints asynchronously: the loop waits only while the state is copied to "
        "host memory, a background writer per rank writes the files; falls back to synchronous "
        "saves (one WARNING) when host memory is short.", both=True)
    preemption_grace_s: float = _f(
        30.0, "Seconds between SIGTERM and the scheduler's SIGKILL (GCE Spot: 30): after the final "
        "save, what is left of them goes to uploading that checkpoint.", metavar="S")
    hang_timeout_s: float | None = _f(
        None, "Seconds a rank may go without completing an optimizer step before its watchdog "
        "prints every thread's stack and exits it with code 75 (a hang); null = the larger of 10x "
        "the median step time and 300 s. The first step gets 3x that (+1800 s with compile), saves "
        "and evaluations more.", metavar="S", **_HEAL)
    loss_guard: bool = _f(
        True, "Skip the update of a step whose loss or gradient norm is not finite, or whose loss "
        "is above loss_spike_factor x the running median, on every rank; roll back after "
        "max_bad_steps such steps in a row.", **_HEAL)
    loss_spike_factor: float = _f(
        2.0, "A step's loss above this many times the median of the last loss_spike_window losses "
        "is a spike; 0 = check only for NaN/inf.", metavar="K", **_HEAL)
    loss_spike_window: int = _f(
        100, "Accepted steps in the spike check's running median (the check starts once it is "
        "full).", **_HEAL)
    max_bad_steps: int = _f(
        3, "Bad steps in a row before rolling back to the newest complete checkpoint before them "
        "and skipping the data consumed since; 0 = never roll back.", metavar="M", **_HEAL)
    max_rollbacks: int = _f(
        3, "Rollbacks a run start may make; one more streak of bad steps stops the run (exit 1, "
        "diverged).", **_HEAL)
    max_pending_uploads: int = _f(
        0, "If more checkpoints than this wait for upload, skip the superseded ones (kept "
        "locally); 0 = never skip.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trackers(self) -> tuple[str, ...]:
        """report_to as names: ("tensorboard", "wandb"); () for none."""
        return tracker_names(self.report_to) or ()

    def data_paths(self) -> list[str]:
        """Where the training data lives: the mixture's paths, else data_dir."""
        return [entry["path"] for entry in self.data] if self.data else [self.data_dir]

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with `changes` (command-line overrides); the original is never
        mutated."""
        return from_dict({**self.to_dict(), **changes})


_FIELD_NAMES = [f.name for f in fields(RunConfig)]


def field_docs() -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in fields(RunConfig)}


def _type_name(value: Any) -> str:
    return type(value).__name__


# The rules, by kind: (fields, lower bound) for integers; the allowed values of each choice field.
_INTS = [(("seq_len", "max_steps", "save_steps", "log_steps", "eval_batches", "vocab_pad_multiple",
           "loss_spike_window"), 1),
         (("eval_steps", "keep_last_n", "seed", "max_pending_uploads", "loss_chunk",
           "max_unpublished_checkpoints", "prefetch_micro_batches", "max_bad_steps",
           "max_rollbacks"), 0)]
# DeepSpeed needs warmup >= 1
_OPTIONAL_INTS = [(("micro_batch", "grad_accum", "max_shards", "warmup_steps",
                    "memory_snapshot", "decay_steps"), 1),
                  (("vocab_size",), 2)]
# field -> (valid values, null allowed), from the fields' `choices` (their flags offer the same)
_CHOICES = {f.name: (f.metadata["choices"], f.default is None) for f in fields(RunConfig)
            if "choices" in f.metadata}
_BOOLS = ("activation_checkpointing", "background_upload", "async_save", "loss_guard",
          "allow_data_change", "parallel_uploads", "document_masking")
_OPTIONAL_STRINGS = ("sync_to", "credentials", "init_from_hf", "compile", "profile_steps")
_STRINGS = ("name", "ds_config", "data_dir", "save_dir", "log_dir")


def _int_problems(values: dict[str, Any]) -> list[str]:
    out = []
    for optional, rules in ((False, _INTS), (True, _OPTIONAL_INTS)):
        for names, lo in rules:
            for name in names:
                v = values.get(name)
                if v is None and optional:
                    continue
                if not is_int(v):
                    out.append(f"{name}={v!r} must be an integer >= {lo}"
                               + (" or null" if optional else ""))
                elif v < lo:
                    out.append(f"{name}={v} is out of range: must be >= {lo}")
    span = values.get("profile_steps")
    if isinstance(span, str) and span and profile_span(span) is None:
        out.append(f"profile_steps={span!r} is not a span of steps (valid: A-B with 1 <= A <= B, "
                   "e.g. 5-7)")
    streams = values.get("transfer_streams")
    if not (is_int(streams) and 1 <= streams <= MAX_TRANSFER_STREAMS):
        out.append(f"transfer_streams={streams!r} must be an integer from 1 to "
                   f"{MAX_TRANSFER_STREAMS} (default {DEFAULT_TRANSFER_STREAMS})")
    return out


def _kind_problems(values: dict[str, Any]) -> list[str]:
    out = []
    for name, (valid, nullable) in _CHOICES.items():
        v = values.get(name)
        if not (v is None and nullable) and v not in valid:
            out.append(f"{name}={v!r} is not valid (valid: "
                       f"{', '.join(valid)}{' or null' if nullable else ''})")
    out += [f"{n}={values.get(n)!r} must be true or false" for n in _BOOLS
            if not isinstance(values.get(n), bool)]
    out += [f"{n}={values.get(n)!r} must be a non-empty string or null" for n in _OPTIONAL_STRINGS
            if values.get(n) is not None
            and (not isinstance(values.get(n), str) or not values.get(n))]
    out += [f"{n}={values.get(n)!r} must be a non-empty string (got {_type_name(values.get(n))})"
            for n in _STRINGS if not isinstance(values.get(n), str) or not values.get(n)]
    return out


def validate(values: dict[str, Any]) -> list[str]:
    """Every problem with `values`, each naming the field, the value and what is valid (empty list:
    fine)."""
    unknown = [f"unknown field '{key}' (valid fields: {', '.join(_FIELD_NAMES)})"
               for key in sorted(set(values) - set(_FIELD_NAMES))]
    return unknown + _int_problems(values) + model_problems(values) + number_problems(values) + \
        _kind_problems(values) + mixture_problems(values) + tracker_problems(values)


def from_dict(values: dict[str, Any], *, source: str = "run config") -> RunConfig:
    """Build a RunConfig, raising ConfigError listing every bad field at once."""
    merged = {**RunConfig().to_dict(), **values}
    problems = validate(merged)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    for name in ("val_fraction", "upload_timeout_s", "peak_tflops", "preemption_grace_s",
                 "hang_timeout_s", "loss_spike_factor", "unreachable_warning_s"):
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
            f"--config {name_or_file!r} is neither a preset ({', '.join(RUN_PRESETS)}) nor an "
            "existing JSON file"
        )
    values = read_json_object(
        path, what=f"a JSON object of run-config fields, or a preset: {', '.join(RUN_PRESETS)}")
    base = values.pop("base", None)
    if base is not None and base not in RUN_PRESETS:
        raise ConfigError(
            f"config file {path}: base={base!r} is not a preset (valid: {', '.join(RUN_PRESETS)})")
    start = dict(RUN_PRESETS[base]) if base else {}
    start["name"] = path.stem
    return from_dict({**start, **values}, source=f"config file {path}")
