"""What tracking costs a step: W&B and MLflow on (report_to=tensorboard,wandb,mlflow) against
TensorBoard alone, in one run.

    .venv/bin/python bench/tracker_bench.py [--preset neox-demo --seq-len 128 --micro-batch 8
                                             --grad-accum 2] [--log-steps 1 --block 10 --rounds 6]

One Trainer (built as neox-train builds it, with both trackers started) trains in blocks of --block
optimizer steps that alternate A B / B A for --rounds rounds after one untimed warm-up each:
A, "on": every logged step's values also go to the trackers' queues, and their threads send them
   (W&B in offline mode: its wandb-core service writes the run file; MLflow to a SQLite store in the
   log dir, in this process: the heavier of its two paths, a server being mostly network waits);
B, "off": the same Trainer with the trackers detached (TensorBoard and metrics.jsonl as always).
An "on" block ends when the trackers have sent all its points (an upper bound: in a run the last
sends overlap the next steps), so an "off" block never pays for them.
--log-steps 1 logs every step (the worst case; the default run config logs every 100). The result
is the median of the per-round A/B time ratios. Prints one JSON line, with what each tracker was
sent and dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from _harness import (
    abba,
    add_demo_shape_arguments,
    build_session,
    median,
    run_in_scratch,
    synthetic_shards,
    timed_block,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_shape_arguments(p)
    p.add_argument("--log-steps", type=int, default=1)
    p.add_argument("--block", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument("--rounds", type=int, default=6)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the SQLite store in the log dir
    data_dir = str(synthetic_shards(work / "tokens", vocab_size=args.vocab_size,
                                    num_tokens=2_000_000))
    total_steps = 2 * args.block * (args.rounds + 1)
    session = build_session(dict(
        name="trackers", model=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, mixed_precision=args.precision, ds_config="zero0",
        max_steps=total_steps, warmup_steps=1, log_steps=args.log_steps, eval_steps=0,
        save_steps=10 * total_steps, keep_last_n=0, val_fraction=0.0, data_dir=data_dir,
        save_dir=str(work / "ckpt"), log_dir=str(work / "logs"), vocab_size=args.vocab_size,
        report_to="tensorboard,wandb,mlflow", tracker_project="bench"))
    trainer = session.trainer
    trackers = trainer.metrics.trackers
    # both trackers started (W&B's service, MLflow's store and run) before anything is timed
    deadline = time.monotonic() + 120
    trackers.log(0, {"bench/ready": 1.0})
    while any(t.sent == 0 for t in trackers.threads) and time.monotonic() < deadline:
        time.sleep(0.1)
    times: dict[str, list[float]] = {"on": [], "off": []}

    def drained() -> None:
        settle = time.monotonic() + 60
        while any(t.pending for t in trackers.threads) and time.monotonic() < settle:
            time.sleep(0.005)

    def block(side: str) -> float:
        on = side == "on"
        trainer.metrics.trackers = trackers if on else None

        def steps() -> None:
            trainer.train(until_step=trainer.step + args.block, final=False)
            if on:
                drained()

        return timed_block(steps)

    try:
        block("on")
        block("off")  # warm-up, untimed
        for order in abba(args.rounds, ["on", "off"]):
            for side in order:
                times[side].append(block(side))
    finally:
        trainer.metrics.trackers = trackers
        session.close()
    counts = trainer.tracker_counts
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    return {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "precision": args.precision, "log_steps": args.log_steps,
        "block_steps": args.block, "rounds": args.rounds,
        "on_step_s_median": median(t / args.block for t in times["on"]),
        "off_step_s_median": median(t / args.block for t in times["off"]),
        "ratio_median": median(ratios), "ratio_of_fastest": min(times["on"]) / min(times["off"]),
        "ratios": ratios, "trackers": counts,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_scratch("trackers", lambda tmp: measure(args, tmp))


if __name__ == "__main__":
    sys.exit(main())
