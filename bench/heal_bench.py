"""What the self-healing parts cost a step: the hang watchdog and the loss guard on, against both
off, in one run.

    .venv/bin/python bench/heal_bench.py [--preset neox-demo --seq-len 128 --micro-batch 8
                                          --grad-accum 2] [--zero 0 --block 10 --rounds 6]

One Trainer (the package's own, built as neox-train builds it) trains in blocks of --block optimizer
steps that alternate A B / B A for --rounds rounds after one untimed warm-up each:
A, "on": the loss guard judges every step (its loss costs one host-device sync and rides on the
   per-step agreement; the update switch sits in the optimizer), and a running watchdog thread
   (beats, allowance checks, the status file it would write under a supervisor: NEOX_STATUS_DIR is
   set to a scratch folder);
B, "off": guard disabled, no watchdog thread.
The result is the median of the per-round A/B time ratios (goal: at most 1.01). Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import os
import sys
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

GOAL = 1.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_shape_arguments(p)
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0)
    p.add_argument("--block", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument("--rounds", type=int, default=6)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    # the watchdog writes status files as under a supervisor
    os.environ["NEOX_STATUS_DIR"] = str(work / "status")
    from neox_train.train.watchdog import HangLimits, Watchdog

    data_dir = str(synthetic_shards(work / "tokens", vocab_size=args.vocab_size,
                                    num_tokens=2_000_000))
    total_steps = 2 * args.block * (args.rounds + 1)
    values = dict(
        name="heal", model=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, mixed_precision=args.precision, ds_config=f"zero{args.zero}",
        max_steps=total_steps, warmup_steps=1, log_steps=10, eval_steps=0,
        save_steps=10 * total_steps, keep_last_n=0, val_fraction=0.0, data_dir=data_dir,
        save_dir=str(work / "ckpt"), log_dir=str(work / "logs"), vocab_size=args.vocab_size,
        hang_timeout_s=3600.0,
    )
    session = build_session(values)
    trainer = session.trainer
    idle = trainer.watchdog  # never started
    limits = HangLimits.from_run(trainer.plan.run)
    times: dict[str, list[float]] = {"on": [], "off": []}

    def block(side: str) -> float:
        on = side == "on"
        trainer.guard.enabled = trainer.switch.active = on
        trainer.watchdog = Watchdog(limits, rank=0).start() if on else idle
        try:
            return timed_block(lambda: trainer.train(until_step=trainer.step + args.block,
                                                     final=False))
        finally:
            if on:
                trainer.watchdog.stop()

    try:
        block("on")
        block("off")  # warm-up, untimed
        for order in abba(args.rounds, ["on", "off"]):
            for side in order:
                times[side].append(block(side))
    finally:
        session.close()
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    ratio = median(ratios)
    return {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "precision": args.precision, "zero": args.zero,
        "block_steps": args.block, "rounds": args.rounds,
        "on_step_s_median": median(t / args.block for t in times["on"]),
        "off_step_s_median": median(t / args.block for t in times["off"]), "ratio_median": ratio,
        "ratio_of_fastest": min(times["on"]) / min(times["off"]), "ratios": ratios,
        "guard_skipped_updates": trainer.guard.skipped_updates, "goal": GOAL,
        "goal_met": ratio <= GOAL,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_scratch("heal", lambda tmp: measure(args, tmp))


if __name__ == "__main__":
    sys.exit(main())
