"""Tokens/s, TFLOP/s per device, MFU/HFU, step breakdown and memory of neox-train on this machine's
device.

    .venv/bin/python bench/throughput.py --preset neox-1.2b --steps 30  # one configuration
    .venv/bin/python bench/throughput.py --preset neox-demo --seq-len 128 --micro-batch 8 \\
        --compare optimizer_impl=torch,torch_fused                      # a switch, interleaved

Builds the real Trainer in this process (the same checks, engine, loader and accounting as
`neox-train`) on synthetic token shards (or --data-dir) and prints one JSON line.

One configuration: trains --steps steps and reports the medians of the trainer's own metrics records
after the first --warmup-intervals log intervals (start-up, allocator warm-up, compilation):
tokens/s, TFLOP/s per device, MFU and HFU (null on CPU unless --peak-tflops), where the step's time
went, and the memory high-water mark.

--compare KEY=V1,V2,...: one Trainer per value of a run-config field (optimizer_impl, compile,
attention, activation_checkpointing, prefetch_micro_batches, vocab_pad_multiple, ...), all in this
process; after one untimed warm-up block each, --rounds rounds of --block steps run in A B / B A
order and each value's step time is divided by the first value's in the same round; the median of
those ratios is reported. Memory is per-process, so it is not separable in this mode: measure it
with one configuration per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _harness import (
    abba,
    build_session,
    median,
    parse_assignments,
    parse_compare,
    read_train_records,
    run_in_scratch,
    synthetic_shards,
    timed_block,
)

RATE_KEYS = ("tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "hfu_tflops_per_gpu", "mfu",
             "hfu", "step_time_s")
BREAKDOWN_KEYS = ("data_wait_s", "fwd_bwd_s", "optimizer_s", "other_s", "data_wait_frac")
MEMORY_KEYS = ("gpu_mem_peak_gib", "gpu_mem_reserved_peak_gib", "host_rss_peak_gib")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    from neox_train.model import MODEL_PRESETS

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="neox-demo", choices=sorted(MODEL_PRESETS),
                   help="model preset")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (one configuration)")
    p.add_argument("--seq-len", type=int,
                   help="tokens per sequence (default: the preset's maximum)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16" if gpu else "no")
    # ZeRO-1 by default on GPU: bf16 at ZeRO-0 accumulates gradients in bf16 (DEEPSPEED_NOTES),
    # ZeRO-1 in fp32; with one process it partitions nothing, so it costs nothing over ZeRO-0.
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1 if gpu else 0)
    p.add_argument("--vocab-size", type=int, default=50257,
                   help="tokenizer vocabulary (padded per vocab_pad_multiple)")
    p.add_argument("--log-steps", type=int, help="steps per metrics record (default: steps // 6)")
    p.add_argument("--warmup-intervals", type=int, default=1,
                   help="log intervals left out of the medians")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config field (repeatable)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s per device for MFU (default: the table; none on CPU)")
    p.add_argument("--compare", metavar="KEY=V1,V2",
                   help="interleave one Trainer per value of a run-config field")
    p.add_argument("--block", type=int, default=5, help="steps per timed block (--compare)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (--compare)")
    p.add_argument("--data-dir",
                   help="token shards to read (default: synthetic shards in a temporary folder)")
    args = p.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = MODEL_PRESETS[args.preset].max_seq_len
    if args.log_steps is None:
        args.log_steps = max(1, args.steps // 6)
    return args


def base_values(args: argparse.Namespace, work: Path, max_steps: int,
                log_steps: int) -> dict[str, Any]:
    data_dir = args.data_dir
    if data_dir is None:
        windows = max_steps * args.micro_batch * args.grad_accum + 64
        data_dir = str(synthetic_shards(work / "tokens", vocab_size=args.vocab_size,
                                        num_tokens=min(windows * args.seq_len + 1, 32_000_000)))
    values = dict(
        name="bench", model=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, mixed_precision=args.precision, ds_config=f"zero{args.zero}",
        max_steps=max_steps, warmup_steps=min(10, max_steps), log_steps=log_steps, eval_steps=0,
        save_steps=10 * max_steps, keep_last_n=0, val_fraction=0.0, data_dir=data_dir,
        save_dir=str(work / "ckpt"), log_dir=str(work / "logs"), peak_tflops=args.peak_tflops,
    )
    if args.data_dir is None:
        values["vocab_size"] = args.vocab_size
    values.update(parse_assignments(args.set))
    return values


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    measured = records[warmup:] or records
    first_step = (records[len(records) - len(measured) - 1]["step"] if len(measured) < len(records)
                  else 0)
    out: dict[str, Any] = {
        "records": len(records),
        "measured_records": len(measured),
        "measured_steps": measured[-1]["step"] - first_step if measured else 0,
    }
    out.update({k: median(r.get(k) for r in measured) for k in RATE_KEYS})
    out["breakdown"] = {k: median(r.get(k) for r in measured) for k in BREAKDOWN_KEYS}
    last = records[-1] if records else {}
    out["memory"] = {k: last[k] for k in MEMORY_KEYS if k in last}
    out["loss_first"] = records[0]["loss"] if records else None
    out["loss_last"] = last.get("loss")
    return out


def one_configuration(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    values = base_values(args, work, args.steps, args.log_steps)
    session = build_session(values)
    trainer = session.trainer
    try:
        trainer.train(final=False)  # no final checkpoint: a benchmark, not a run to keep
    finally:
        session.close()
    records = read_train_records(Path(values["log_dir"]))
    return {
        "mode": "single",
        "switches": parse_assignments(args.set),
        **config_summary(args, trainer),
        **summarize(records, args.warmup_intervals),
    }


def config_summary(args: argparse.Namespace, trainer) -> dict[str, Any]:
    return {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "precision": args.precision, "zero": args.zero,
        "steps": trainer.step, "vocab_size": trainer.plan.model_config.vocab_size,
        "flops_per_token": trainer.flops.model_flops_per_token,
        "hardware_flops_per_token": trainer.flops.hardware_flops_per_token,
        "peak_tflops": trainer.flops.peak.tflops, "peak_source": trainer.flops.peak.source,
    }


def compare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    key, options = parse_compare(args.compare)
    max_steps = args.block * (args.rounds + 1)
    sessions = []
    for i, value in enumerate(options):
        values = base_values(args, work, max_steps, args.block)
        values.update({key: value, "log_dir": str(work / f"logs{i}"),
                       "save_dir": str(work / f"ckpt{i}")})
        if i:
            values["data_dir"] = sessions[0][1]["data_dir"]  # the same shards for every variant
        sessions.append((build_session(values), values))
    names = [str(i) for i in range(len(options))]
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for session, _ in sessions:  # warm-up, untimed: allocator, caches, compilation
            session.trainer.train(until_step=args.block, final=False)
        for order in abba(args.rounds, names):
            for n in order:
                trainer = sessions[int(n)][0].trainer
                times[n].append(timed_block(
                    lambda: trainer.train(until_step=trainer.step + args.block, final=False)))
    finally:
        for session, _ in sessions:
            session.close()
    base = times[names[0]]
    variants = []
    for n, value in zip(names, options):
        records = read_train_records(Path(sessions[int(n)][1]["log_dir"]))
        summary = summarize(records, 1)
        summary.pop("memory")
        variants.append({
            "value": value,
            "step_time_s_median": median(t / args.block for t in times[n]),
            "ratio_to_first": median(t / b for t, b in zip(times[n], base)),
            "per_round_ratio": [t / b for t, b in zip(times[n], base)],
            **{k: summary[k] for k in ("tokens_per_s", "tflops_per_gpu", "mfu", "hfu", "breakdown",
                                       "loss_last")},
        })
    return {
        "mode": "compare", "switch": key, "rounds": args.rounds, "block_steps": args.block,
        "switches": parse_assignments(args.set), **config_summary(args, sessions[0][0].trainer),
        "variants": variants,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    measure = compare if args.compare else one_configuration
    return run_in_scratch("throughput", lambda tmp: measure(args, tmp))


if __name__ == "__main__":
    sys.exit(main())
