"""`neox-convert-hf`: a neox-train checkpoint (folder or bucket) -> a HuggingFace folder."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from neox_train.convert import DEFAULT_MAX_SHARD_SIZE, DEFAULT_TAG
from neox_train.errors import run_guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neox-convert-hf",
        description="Convert a neox-train DeepSpeed checkpoint (ZeRO 0-3, any number of ranks, a "
                    "folder or gs://) to a HuggingFace GPTNeoX folder.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run's save dir (or one global_stepN folder), or a published "
                        "gs://bucket/prefix / file:// URL (only COMPLETE checkpoints, verified "
                        "against their manifest)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (must not exist unless --overwrite)")
    p.add_argument("--tag", default=DEFAULT_TAG, metavar="TAG|latest",
                   help="checkpoint tag (default: latest)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the saved weights (default: the run's training precision)")
    p.add_argument("--verify", action="store_true",
                   help="run the same tokens through the checkpoint's model and the export; fail "
                        "unless logits agree")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help="split safetensors above this size, with an index (default 2GB)")
    p.add_argument("--unpad-vocab", action="store_true",
                   help="cut the embedding rows padded beyond the tokenizer's vocabulary (default: "
                        "keep them)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer.json to include (default: the one in the checkpoint or the "
                        "run's data_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--credentials", metavar="FILE",
                   help="service-account JSON for gs:// (default: GOOGLE_APPLICATION_CREDENTIALS)")
    p.add_argument("--json", action="store_true",
                   help="print a summary as one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        with _stdout_to_stderr():
            # Deferred: torch, safetensors and transformers (~1.3 s) load only once the flags
            # parsed; inside the redirect, so nothing they print at import reaches the --json
            # stdout.
            from neox_train.convert.to_hf import convert

            summary = convert(args)
        if args.json:
            print(json.dumps(summary), flush=True)
        return 0

    return run_guarded("neox-convert-hf", go)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Stdout carries only the --json object. DeepSpeed logs through a handler bound to stdout at
    import time and zero_to_fp32 print()s, so the redirect is done on file descriptor 1 itself, for
    the whole conversion."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
