"""Resuming from a checkpoint: what the two cuts of issue 22 save, each against what it replaced,
alternating, in one process.

    .venv/bin/python bench/resume_bench.py [--preset neox-160m] [--rounds 3]

1. build: the model with its random init (what a fresh run needs, and what a resume did) against the
   same under transformers' no_init_weights (what a resume does now: the checkpoint overwrites every
   parameter).
2. load: DeepSpeed's engine.load_checkpoint as it comes (its loader reads the model-states file
   twice) against train_state.load (each file read once: each_file_read_once).

The checkpoint is written by the same session first (ZeRO-0, fp32 by default: one model-states file
of weights and Adam states, 1.95 GB for neox-160m); both loads read it from the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import _harness as h


def measure(scratch: Path, args) -> dict:
    from transformers.initialization import no_init_weights

    from neox_train.checkpoint.local import train_state
    from neox_train.model import build_model

    data = h.synthetic_shards(scratch / "data", vocab_size=args.vocab_size, num_tokens=200_000)
    save_dir = scratch / "ckpt"
    session = h.build_session(dict(
        model=args.preset, seq_len=args.seq_len, vocab_size=args.vocab_size, micro_batch=1,
        grad_accum=1, mixed_precision=args.precision, ds_config="zero0", max_steps=100_000,
        save_steps=100_000, log_steps=100_000, eval_steps=0, keep_last_n=1, val_fraction=0.01,
        data_dir=str(data), save_dir=str(save_dir), log_dir=str(scratch / "logs"),
        async_save=False))
    trainer = session.trainer
    try:
        trainer.train(until_step=1, final=False)
        trainer.save(asynchronous=False)
        tag = "global_step1"
        size = sum(p.stat().st_size for p in (save_dir / tag).rglob("*") if p.is_file())
        engine, config = trainer.engine, session.plan.model_config
        seconds: dict[str, list[float]] = {k: [] for k in
                                           ("init", "no_init", "deepspeed_load", "ours_load")}

        def build(skip_init: bool) -> float:
            started = time.perf_counter()
            with no_init_weights() if skip_init else contextlib.nullcontext():
                model = build_model(config)
            took = time.perf_counter() - started
            del model
            return took

        def load(ours: bool) -> float:
            started = time.perf_counter()
            if ours:
                train_state.load(engine, save_dir, tag)
            else:
                engine.load_checkpoint(str(save_dir), tag=tag)
            return time.perf_counter() - started

        for order in h.abba(args.rounds, ["a", "b"]):
            for variant in order:
                first = variant == "a"
                seconds["init" if first else "no_init"].append(build(not first))
                seconds["deepspeed_load" if first else "ours_load"].append(load(not first))
    finally:
        session.close()
    med = {k: round(h.median(v), 3) for k, v in seconds.items()}
    return {"preset": args.preset, "checkpoint_gb": round(size / 1e9, 2), "rounds": args.rounds,
            "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
            "median_s": med,
            "build_saved_s": round(med["init"] - med["no_init"], 3),
            "load_saved_s": round(med["deepspeed_load"] - med["ours_load"], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_demo_shape_arguments(p)
    p.set_defaults(preset="neox-160m", vocab_size=50304, seq_len=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    return h.run_in_scratch("resume_bench", lambda scratch: measure(scratch, args))


if __name__ == "__main__":
    sys.exit(main())
