"""neox-train's flags, and the one mapping from flags to run-config overrides (neox-train, and neox-launch for the
neox-train flags it passes through)."""

from __future__ import annotations

import argparse
import dataclasses

from neox_train.config import OPTIMIZER_IMPLS, PRECISIONS, RunConfig, load_run_config
from neox_train.errors import ConfigError
from neox_train.model import ATTENTION_IMPLS


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neox-train",
        description="Train a GPT-NeoX model with the DeepSpeed engine. Run under `deepspeed` for several processes.",
    )
    p.add_argument("--config", default="production", help="run preset (test, production, demo) or a JSON file")
    p.add_argument("--ds-config", help="DeepSpeed JSON: a name in ds_configs/ (zero0..zero3) or a path")
    p.add_argument("--data-dir", help="folder of token shards (.npy/.npz, nested folders)")
    p.add_argument("--save-dir", help="checkpoint folder")
    p.add_argument("--log-dir", help="folder for training.log, metrics.jsonl and TensorBoard events")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per micro-step (overrides the DeepSpeed JSON)")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (overrides the DeepSpeed JSON)")
    p.add_argument("--mixed-precision", choices=PRECISIONS, help="bf16, fp16 or no (overrides the DeepSpeed JSON)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--log-steps", type=int, help="log every N steps")
    p.add_argument("--eval-steps", type=int, help="evaluate every N steps (0: never)")
    p.add_argument("--seed", type=int, help="seed for model init and data order")
    p.add_argument("--resume", metavar="latest|auto|TAG|URL",
                   help="continue from a checkpoint: latest or a tag in --save-dir, or the newest COMPLETE one at a "
                        "gs:// or file:// URL (latest also falls back to --sync-to when --save-dir has none); auto: "
                        "like latest, but a start from step 0 when there is no checkpoint anywhere yet (what the "
                        "supervisor restarts with)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the data mixture (paths, weights) changed since the checkpoint")
    p.add_argument("--sync-to", metavar="URL",
                   help="publish checkpoints to gs://bucket/prefix, file:///path or a folder")
    p.add_argument("--takeover", action="store_true",
                   help="publish to a --sync-to prefix that another run owns (that run can no longer publish there; "
                        "what it published stays as it is)")
    p.add_argument("--credentials", metavar="FILE",
                   help="service-account JSON for gs:// (default: GOOGLE_APPLICATION_CREDENTIALS)")
    p.add_argument("--init-from-hf", metavar="DIR",
                   help="start from a HuggingFace GPTNeoX folder's weights (continued pretraining; same shape as the "
                        "preset)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, about a third more compute")
    perf = p.add_argument_group("performance (each switch is measured in the README's Performance section)")
    perf.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS,
                      help="AdamW kernel: torch, torch_fused (no build; the default) or deepspeed_fused "
                           "(DeepSpeed FusedAdam, JIT-built with nvcc)")
    perf.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                      help="torch.compile the model via engine.compile() (default backend: inductor)")
    perf.add_argument("--attention", choices=ATTENTION_IMPLS,
                      help="sdpa (default; FlashAttention on CUDA in bf16/fp16) or eager")
    perf.add_argument("--vocab-pad-multiple", type=int, metavar="N",
                      help="pad the vocabulary to a multiple of N (default 128; 1 = no padding)")
    perf.add_argument("--prefetch", type=int, metavar="N", dest="prefetch_micro_batches",
                      help="micro-batches assembled ahead in a background thread (default 2; 0 = in the loop)")
    perf.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                      help="peak TFLOP/s per device for MFU (default: the table for known GPUs; none on CPU)")
    save = p.add_mutually_exclusive_group()
    save.add_argument("--async-save", action="store_true", default=None, dest="async_save",
                      help="save checkpoints in the background: the loop waits only for the copy to host memory "
                           "(the default, where host memory allows)")
    save.add_argument("--no-async-save", action="store_false", dest="async_save",
                      help="save checkpoints synchronously: the loop waits until the files are on disk")
    p.add_argument("--preemption-grace-s", type=float, metavar="S",
                   help="seconds from SIGTERM to SIGKILL (default 30, GCE Spot): the final save, then uploading it")
    heal = p.add_argument_group("self-healing (see docs/training.md)")
    heal.add_argument("--hang-timeout-s", type=float, metavar="S",
                      help="a rank with no optimizer step for S seconds prints its stacks and exits (code 75); "
                           "default: max(10x the median step, 300 s)")
    heal.add_argument("--no-loss-guard", action="store_true",
                      help="apply every update, even with a NaN/inf or spiking loss (default: skip them, roll back "
                           "after --max-bad-steps in a row)")
    heal.add_argument("--loss-spike-factor", type=float, metavar="K",
                      help="a loss above K x the running median is a spike (default 2; 0 = NaN/inf only)")
    heal.add_argument("--max-bad-steps", type=int, metavar="M",
                      help="bad steps in a row before a rollback (default 3; 0 = never roll back)")
    p.add_argument("--no-background-upload", action="store_true",
                   help="upload inside save, blocking training (debugging); default: a background process")
    p.add_argument("--describe", action="store_true", help="print the effective configuration as JSON and exit")
    # The deepspeed launcher appends --local_rank=N; the rank itself comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_config_from_args(ns: argparse.Namespace) -> RunConfig:
    """The run config neox-train will build from the same flags: flags left at their default do not override."""
    run = load_run_config(ns.config)
    if ns.data_dir and run.data:
        raise ConfigError(f"--data-dir {ns.data_dir}: the config {ns.config} trains on a mixture (`data`); give one "
                          f"or the other (edit `data` to change the mixture)")
    names = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {k: v for k, v in vars(ns).items() if k in names and v is not None and v is not False}
    if ns.async_save is False:
        overrides["async_save"] = False
    if ns.no_loss_guard:
        overrides["loss_guard"] = False
    if ns.no_background_upload:
        overrides["background_upload"] = False
    return run.replace(**overrides) if overrides else run
