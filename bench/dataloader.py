"""Samples/s of the shard loader against what the model consumes, and the data-wait share of the
training step.

    .venv/bin/python bench/dataloader.py [--preset neox-demo --seq-len 128 --micro-batch 8
                                          --grad-accum 2] [--batches 400 --steps 12 --prefetch 2]

1. The loader alone: the trainer's `MicroBatchLoader` over memory-mapped shards, drained as fast as
   it delivers (on CUDA including the pinned, non-blocking copy to the GPU), assembled on demand
   (prefetch 0) and by the background thread (--prefetch), alternating, --loader-rounds times:
   samples/s.
2. The model: two real Trainers on the same shards and shape, prefetch 0 and --prefetch, alternating
   blocks of --block steps (A B / B A); the samples/s the model consumes and the trainer's own
   data-wait fraction (the time the loop blocked on the loader, over the step time) for each.

--mixture N splits the synthetic tokens into N datasets drawn with weights N, N-1, ..., 1 (run
config `data`): the loader then runs the mixture's sampler and window lookup, the trainers train on
the mixture.

headroom = loader samples/s / model samples/s (how much faster the loader is than the model needs
it). Goal: data wait under 1% of the step. Synthetic shards are freshly written, so they sit in the
page cache; a first epoch over a dataset larger than RAM also reads from disk. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _harness import (
    abba,
    add_demo_shape_arguments,
    build_session,
    median,
    read_train_records,
    run_in_scratch,
    sync,
    synthetic_shards,
    timed_block,
)

GOAL_DATA_WAIT = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_shape_arguments(p)
    p.add_argument("--prefetch", type=int, default=2, help="the prefetching loader's depth")
    p.add_argument("--batches", type=int, default=400, help="micro-batches per loader measurement")
    p.add_argument("--loader-rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=4, help="optimizer steps per timed training block")
    p.add_argument("--rounds", type=int, default=4, help="training rounds per variant")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8_000_000,
                   help="synthetic tokens in all shards together")
    p.add_argument("--data-dir",
                   help="token shards (default: synthetic shards in a temporary folder)")
    p.add_argument("--mixture", type=int, default=1, metavar="N",
                   help="N synthetic datasets, weights N..1")
    args = p.parse_args(argv)
    if args.prefetch < 1:
        p.error("--prefetch must be >= 1 (prefetch 0 is always measured as the baseline)")
    return args


def loader_rate(windows, split, *, seq_len: int, micro_batch: int, prefetch: int, batches: int,
                seed: int) -> float:
    """Micro-batches drained from a fresh loader as fast as it delivers them: samples/s."""
    import torch

    from neox_train.data.loader import MicroBatchLoader
    from neox_train.data.mixture import make_stream

    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    stream = make_stream(split, seed=seed, micro_batch=micro_batch, dp_rank=0, dp_size=1)
    loader = MicroBatchLoader(windows, stream, device=device, prefetch=prefetch)
    try:
        loader.next()  # thread start-up and first touch are not the steady state
        sync()
        started = time.perf_counter()
        for _ in range(batches):
            loader.next()
        sync()
        return batches * micro_batch / (time.perf_counter() - started)
    finally:
        loader.close()


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from neox_train.data.mixture import combine
    from neox_train.data.shards import discover_shards, open_shard
    from neox_train.data.windows import PackedWindows, split_windows

    n = max(1, args.mixture)
    folders = [args.data_dir] if args.data_dir and n == 1 else [
        str(synthetic_shards(work / f"tokens{i}", vocab_size=args.vocab_size,
                             num_tokens=args.tokens // n, shards=max(1, args.shards // n),
                             seed=i)) for i in range(n)]
    data_dir = folders[0]
    weights = [float(n - i) for i in range(n)]
    if n == 1:
        windows = PackedWindows([open_shard(p) for p in discover_shards(data_dir)], args.seq_len)
        split = split_windows(len(windows), 0.0)
    else:
        datasets = []
        for i, folder in enumerate(folders):
            w = PackedWindows([open_shard(p) for p in discover_shards(folder)], args.seq_len)
            datasets.append((f"d{i}", folder, weights[i], w, split_windows(len(w), 0.0)))
        windows, split = combine(datasets)
    rates: dict[str, list[float]] = {"prefetch_0": [], f"prefetch_{args.prefetch}": []}
    for order in abba(args.loader_rounds, [0, args.prefetch]):
        for prefetch in order:
            rates[f"prefetch_{prefetch}"].append(loader_rate(
                windows, split, seq_len=args.seq_len, micro_batch=args.micro_batch,
                prefetch=prefetch, batches=args.batches, seed=len(rates[f"prefetch_{prefetch}"]),
            ))

    total_steps = args.block * (args.rounds + 1)
    trainers = {}
    for prefetch in (0, args.prefetch):
        values = dict(
            name=f"dataloader{prefetch}", model=args.preset, seq_len=args.seq_len,
            micro_batch=args.micro_batch, grad_accum=args.grad_accum,
            mixed_precision=args.precision, ds_config="zero0", max_steps=total_steps,
            warmup_steps=1, log_steps=args.block, eval_steps=0, save_steps=10 * total_steps,
            keep_last_n=0, val_fraction=0.0, data_dir=data_dir,
            save_dir=str(work / f"ckpt{prefetch}"), log_dir=str(work / f"logs{prefetch}"),
            prefetch_micro_batches=prefetch,
        )
        if args.data_dir is None:
            values["vocab_size"] = args.vocab_size
        if n > 1:
            values["data"] = [{"path": f, "weight": w} for f, w in zip(folders, weights)]
        trainers[prefetch] = (build_session(values), Path(values["log_dir"]))
    times: dict[int, list[float]] = {p: [] for p in trainers}
    try:
        for session, _ in trainers.values():
            session.trainer.train(until_step=args.block, final=False)  # warm-up, untimed
        for order in abba(args.rounds, list(trainers)):
            for prefetch in order:
                trainer = trainers[prefetch][0].trainer
                times[prefetch].append(
                    timed_block(lambda: trainer.train(until_step=trainer.step + args.block,
                                                      final=False)))
    finally:
        for session, _ in trainers.values():
            session.close()

    samples_per_step = args.micro_batch * args.grad_accum
    loader = {k: median(v) for k, v in rates.items()}
    model = {}
    for prefetch, (_, log_dir) in trainers.items():
        records = read_train_records(log_dir)[1:]  # the warm-up block's record is left out
        model[f"prefetch_{prefetch}"] = {
            "samples_per_s": median(samples_per_step * args.block / t for t in times[prefetch]),
            "data_wait_frac": median(r["data_wait_frac"] for r in records),
            "data_wait_s_per_step": median(r["data_wait_s"] for r in records),
            "step_time_s": median(r["step_time_s"] for r in records),
        }
    chosen = f"prefetch_{args.prefetch}"
    return {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "precision": args.precision, "datasets": n,
        "weights": weights, "shards": sum(len(discover_shards(f)) for f in folders),
        "windows": len(windows), "loader_samples_per_s": loader, "model": model,
        "headroom": loader[chosen] / model[chosen]["samples_per_s"],
        "data_wait_frac": model[chosen]["data_wait_frac"], "goal_data_wait_frac": GOAL_DATA_WAIT,
        "goal_met": model[chosen]["data_wait_frac"] < GOAL_DATA_WAIT,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_scratch("dataloader", lambda tmp: measure(args, tmp))


if __name__ == "__main__":
    sys.exit(main())
