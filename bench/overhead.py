"""What neox-train's loop costs on top of a bare DeepSpeed loop: same engine, model and batches,
interleaved.

    .venv/bin/python bench/overhead.py [--preset neox-demo --seq-len 128 --micro-batch 8
                                        --grad-accum 2] [--block 10 --rounds 6 --log-steps 10]

A, the full trainer: `Trainer.train()` as `neox-train` runs it: the prefetching loader over
memory-mapped shards, the per-phase accounting, loss bookkeeping, and every --log-steps a record
(loss all-reduced, gradient norm, TFLOP/s and memory, metrics.jsonl, TensorBoard, the log line, a
status poll of a live background upload worker), plus the evaluation, checkpoint and stop checks of
every step.
B, the bare loop: per micro-batch `engine(input_ids)` -> fp32 cross-entropy -> `engine.backward` ->
`engine.step`, over batches already in memory (data costs B nothing).

B trains the very engine A trains, on the windows A takes in the same round, and the two alternate A
B / B A for
--rounds rounds of --block optimizer steps after one untimed warm-up each. The result is the median
of the per-round A/B time ratios (goal: at most 1.03). Checkpoint saves are not in either side
(save_steps lies beyond the run): what a save costs the loop is the checkpoint stall, reported by
the trainer and by bench/sync_bench.py. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _harness import (
    abba,
    add_demo_shape_arguments,
    build_session,
    median,
    read_train_records,
    run_in_scratch,
    synthetic_shards,
    timed_block,
)

GOAL = 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_shape_arguments(p)
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0)
    p.add_argument("--log-steps", type=int, default=10,
                   help="the trainer's log interval (the demo's)")
    p.add_argument("--block", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--no-sync", action="store_true",
                   help="no background upload worker in the trainer")
    p.add_argument("--data-dir",
                   help="token shards (default: synthetic shards in a temporary folder)")
    return p.parse_args(argv)


def bare_loop(engine, batches) -> None:
    import torch.nn.functional as F

    for batch in batches:
        logits = engine(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                               batch[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()


def upcoming_batches(trainer, steps: int) -> list:
    """The micro-batches the trainer will take next (its loader's position), assembled and on the
    device now."""
    import torch

    from neox_train.data.windows import SampleStream

    stream = SampleStream(
        trainer.split.train, seed=trainer.plan.run.seed, micro_batch=trainer.micro_batch,
        dp_rank=trainer.rank, dp_size=trainer.plan.dp_size,
        consumed_samples=trainer.loader.consumed_samples,
    )
    return [torch.from_numpy(trainer.windows.batch(stream.next_micro_batch())).to(trainer.device)
            for _ in range(steps * trainer.grad_accum)]


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data_dir = args.data_dir or str(synthetic_shards(work / "tokens", vocab_size=args.vocab_size,
                                                     num_tokens=2_000_000))
    # the engine's scheduler sees A's and B's steps
    total_steps = 2 * args.block * (args.rounds + 1)
    values = dict(
        name="overhead", model=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, mixed_precision=args.precision, ds_config=f"zero{args.zero}",
        max_steps=total_steps, warmup_steps=1, log_steps=args.log_steps, eval_steps=0,
        save_steps=10 * total_steps, keep_last_n=0, val_fraction=0.0, data_dir=data_dir,
        save_dir=str(work / "ckpt"), log_dir=str(work / "logs"),
        sync_to=None if args.no_sync else str(work / "bucket"),
    )
    if args.data_dir is None:
        values["vocab_size"] = args.vocab_size
    session = build_session(values)
    trainer = session.trainer
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    try:
        def trainer_block() -> None:
            trainer.train(until_step=trainer.step + args.block, final=False)

        # Warm-up, untimed: allocator, first-touch of the shards, the worker's start.
        bare_loop(trainer.engine, upcoming_batches(trainer, args.block))
        trainer_block()
        for order in abba(args.rounds, ["trainer", "bare"]):
            batches = upcoming_batches(trainer, args.block)
            for side in order:
                if side == "trainer":
                    times["trainer"].append(timed_block(trainer_block))
                else:
                    times["bare"].append(timed_block(lambda: bare_loop(trainer.engine, batches)))
    finally:
        session.close()
    ratios = [a / b for a, b in zip(times["trainer"], times["bare"])]
    # the first interval includes the warm-up
    records = read_train_records(Path(values["log_dir"]))[1:]
    ratio = median(ratios)
    return {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "precision": args.precision, "zero": args.zero,
        "log_steps": args.log_steps, "block_steps": args.block, "rounds": args.rounds,
        "upload_worker": not args.no_sync,
        "trainer_step_s_median": median(t / args.block for t in times["trainer"]),
        "bare_step_s_median": median(t / args.block for t in times["bare"]),
        "ratio_median": ratio,
        # The least-disturbed block of each side: a second estimate, robust to bursts of load from
        # other processes.
        "ratio_of_fastest": min(times["trainer"]) / min(times["bare"]),
        "ratios": ratios,
        "goal": GOAL,
        "goal_met": ratio <= GOAL,
        "data_wait_frac_median": median(r.get("data_wait_frac") for r in records),
        "trainer_breakdown_median": {k: median(r.get(k) for r in records)
                                     for k in ("step_time_s", "data_wait_s", "fwd_bwd_s",
                                               "optimizer_s", "other_s")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_scratch("overhead", lambda tmp: measure(args, tmp))


if __name__ == "__main__":
    sys.exit(main())
