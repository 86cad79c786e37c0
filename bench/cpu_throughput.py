"""CPU throughput of neox-train at 1 and 2 processes, measured in one run through the real entry
points.

    .venv/bin/python bench/cpu_throughput.py [--config demo] [--steps 40] [--json]

Trains the given run preset (default: the demo) for --steps steps at 1 process and at 2 processes
(the `deepspeed` launcher, gloo), each rank keeping its micro-batch, and reads tokens/s from
metrics.jsonl, skipping the first log interval (start-up, allocator warm-up). On CPU only the ratio
between the two is meaningful; absolute tokens/s and MFU belong on a GPU. Needs the data the preset
points at (for the demo:
`neox-data prepare --input builtin:pydoc --output data/demo --vocab-size 4096`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(config: str, nprocs: int, steps: int, log_steps: int, workdir: Path) -> dict:
    save, logs = workdir / f"ckpt{nprocs}", workdir / f"logs{nprocs}"
    # Training throughput only: no checkpoint publication (the demo preset syncs to ./bucket by
    # default).
    run_config = workdir / f"run{nprocs}.json"
    run_config.write_text(json.dumps({"base": config, "sync_to": None}))
    args = [
        "--config", str(run_config), "--max-steps", str(steps), "--log-steps", str(log_steps),
        "--eval-steps", "0", "--save-steps", str(steps * 10), "--save-dir", str(save), "--log-dir",
        str(logs),
    ]
    exe = str(BIN / "neox-train")
    cmd = [exe, *args] if nprocs == 1 else [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), exe,
                                            *args]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    # Each rank gets an equal share of the cores, as on a GPU node each rank gets its own device.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][1:]  # first interval includes warm-up
    return {
        "processes": nprocs,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "step_time_s": statistics.median(r["step_time_s"] for r in train),
        "first_loss": records[0]["loss"],
        "last_loss": train[-1]["loss"],
        "wall_s": wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-steps", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.config, 1, args.steps, args.log_steps, Path(tmp))
        two = run(args.config, 2, args.steps, args.log_steps, Path(tmp))
    result = {
        "config": args.config,
        "cpu_count": os.cpu_count(),
        "steps": args.steps,
        "one_process": one,
        "two_processes": two,
        "scaling_2_over_1": two["tokens_per_s"] / one["tokens_per_s"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for r in (one, two):
            print(f"{r['processes']} process(es): {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['step_time_s']:.3f} s/step",
                  file=sys.stderr)
        print(f"2-process / 1-process tokens/s: {result['scaling_2_over_1']:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
