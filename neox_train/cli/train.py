"""Console entry points: `neox-train` and `neox-data`. Parse, hand over to package code, map errors to one line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from neox_train.config import OPTIMIZER_IMPLS, PRECISIONS, load_run_config
from neox_train.errors import ConfigError, DataError
from neox_train.model import ATTENTION_IMPLS


def _run_guarded(prog: str, fn: Callable[[], int]) -> int:
    """Bad input -> `prog: error: <one line>` on stderr and exit 2, before any expensive work."""
    from neox_train.errors import StorageError

    try:
        return fn()
    except (ConfigError, DataError, StorageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "UnpublishedCheckpoints":
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


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
    p.add_argument("--resume", metavar="latest|TAG|URL",
                   help="continue from a checkpoint: latest or a tag in --save-dir, or the newest COMPLETE one at a "
                        "gs:// or file:// URL (latest also falls back to --sync-to when --save-dir has none)")
    p.add_argument("--sync-to", metavar="URL", help="publish checkpoints to gs://bucket/prefix, file:///path or a folder")
    p.add_argument("--takeover", action="store_true",
                   help="publish to a --sync-to prefix that another run owns (that run can no longer publish there; "
                        "what it published stays as it is)")
    p.add_argument("--credentials", metavar="FILE", help="service-account JSON for gs:// (default: GOOGLE_APPLICATION_CREDENTIALS)")
    p.add_argument("--init-from-hf", metavar="DIR",
                   help="start from a HuggingFace GPTNeoX folder's weights (continued pretraining; same shape as the preset)")
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
    p.add_argument("--no-background-upload", action="store_true",
                   help="upload inside save, blocking training (debugging); default: a background process")
    p.add_argument("--describe", action="store_true", help="print the effective configuration as JSON and exit")
    # The deepspeed launcher appends --local_rank=N; the rank itself comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


_OVERRIDES = {
    "ds_config": "ds_config", "data_dir": "data_dir", "save_dir": "save_dir", "log_dir": "log_dir",
    "max_steps": "max_steps", "micro_batch": "micro_batch", "grad_accum": "grad_accum",
    "mixed_precision": "mixed_precision", "seq_len": "seq_len", "save_steps": "save_steps",
    "log_steps": "log_steps", "eval_steps": "eval_steps", "seed": "seed", "sync_to": "sync_to",
    "credentials": "credentials", "init_from_hf": "init_from_hf",
    "optimizer_impl": "optimizer_impl", "compile": "compile", "attention": "attention",
    "vocab_pad_multiple": "vocab_pad_multiple", "prefetch_micro_batches": "prefetch_micro_batches",
    "peak_tflops": "peak_tflops",
}


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)

    def go() -> int:
        run = load_run_config(args.config)
        overrides = {field: getattr(args, arg) for arg, field in _OVERRIDES.items() if getattr(args, arg) is not None}
        if args.no_background_upload:
            overrides["background_upload"] = False
        if args.activation_checkpointing:
            overrides["activation_checkpointing"] = True
        if overrides:
            run = run.replace(**overrides)
        # Heavy imports (torch, transformers, deepspeed) only after the cheap checks above passed.
        import torch

        from neox_train.train.trainer import prepare_run, run_training, world_size_from_env

        if args.describe:
            plan = prepare_run(run, dp_size=world_size_from_env(), on_gpu=torch.cuda.is_available())
            print(json.dumps(plan.describe(), indent=2))
            return 0
        summary = run_training(run, resume=args.resume, takeover=args.takeover)
        # Stopped by SIGTERM (checkpoint saved and flushed): 128+15, so a scheduler sees a preempted job, not a
        # finished one.
        return 143 if summary.get("stopped_by_signal") else 0

    return _run_guarded("neox-train", go)


def data_parser() -> argparse.ArgumentParser:
    from neox_train.data.prepare import add_prepare_arguments

    p = argparse.ArgumentParser(prog="neox-data", description="Prepare token shards for neox-train.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="text/jsonl (or builtin:pydoc) -> token shards + tokenizer")
    add_prepare_arguments(prep)
    from neox_train.cli.sync import add_download_arguments

    download = sub.add_parser("download", help="bucket (gs://...) -> local folder: skip existing, keep nested folders")
    add_download_arguments(download)
    return p


def data_main(argv: list[str] | None = None) -> int:
    args = data_parser().parse_args(argv)

    def go() -> int:
        if args.command == "download":
            from neox_train.cli.sync import main_download

            return main_download(args)
        from neox_train.data.prepare import main_prepare

        return main_prepare(args)

    return _run_guarded("neox-data", go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
