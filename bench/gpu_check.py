"""The GPU check in one call (bench/gpu_check.sh runs it): the `gpu`-marked tests, neox-1.2b at seq
2048 (eager and compiled; packed with document masking and plain; at the planner's micro-batch for
this GPU), the asynchronous save stall of its checkpoint, then one JSON and one markdown table.

    bash bench/gpu_check.sh [--out DIR]     # on one H100: at most ~8 minutes
    bash bench/gpu_check.sh --dry-run       # every step, tiny, on the CPU (tests/test_bench.py)

Each step runs as a process of its own under a time limit, so one that fails or hangs costs its
step, not the check; its status, seconds and figures go in the JSON. MFU is against the device's
dense bf16 peak (train/perf.py's table, never the with-sparsity figure).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

# (name, what bench/throughput.py is given on top of the shape)
VARIANTS = (("eager", []), ("compiled", ["--set", "compile=inductor"]),
            ("document_masking", ["--set", "document_masking=true"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--out", type=Path, default=REPO / "gpu_check_out")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per throughput run")
    return p.parse_args(argv)


def shape(dry: bool) -> list[str]:
    if dry:
        return ["--preset", "neox-tiny", "--seq-len", "64", "--vocab-size", "256",
                "--precision", "no", "--zero", "0"]
    return ["--preset", "neox-1.2b", "--seq-len", "2048", "--precision", "bf16", "--zero", "1"]


def run_step(name: str, cmd: list[str], timeout_s: float, out: Path) -> dict:
    """One step: its status (ok / failed / timeout), seconds, and its last JSON line when it
    printed one; its output in OUT/NAME.log."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status, stdout = f"timeout ({timeout_s:.0f} s)", (e.stdout or b"").decode(errors="replace")
        stderr = (e.stderr or b"").decode(errors="replace")
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n{stderr}")
    result = None
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except ValueError:
                pass
    print(f"gpu_check: {name}: {status} in {time.perf_counter() - started:.1f} s", file=sys.stderr,
          flush=True)
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
            "result": result}


def planned_micro_batch(dry: bool) -> int:
    """What the planner picks for the production config on this one GPU (its memory as torch
    reports it)."""
    if dry:
        return 2
    import torch

    from neox_train.config import load_run_config
    from neox_train.launch import planner

    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = planner.choose(planner.request_from_run(
        load_run_config("production"), gpus=1, nodes=1, gpu_mem_gib=gib, gpu_mem_source="torch"))
    return plan.micro_batch


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": None}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def table(report: dict) -> str:
    rows = ["| step | status | s | tokens/s | TFLOP/s/GPU | MFU | peak GiB | other |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["steps"]:
        r = s["result"] or {}
        other = ""
        if s["step"] == "save_stall":
            other = json.dumps({k: r[k] for k in ("stages",) if k in r})[:120]
        if s["step"] == "gpu_tests":
            other = s.get("summary", "")

        def f(key, fmt):
            return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else ""

        rows.append(f"| {s['step']} | {s['status']} | {s['seconds']} | "
                    f"{f('tokens_per_s', '{:.0f}')} | {f('tflops_per_gpu', '{:.1f}')} | "
                    f"{f('mfu', '{:.3f}')} | {f('gpu_mem_peak_gib', '{:.1f}')} | {other} |")
    env = report["environment"]
    return (f"GPU check, {report['date']}: {env.get('device') or 'CPU (dry run)'}, torch "
            f"{env['torch']}, micro-batch {report['micro_batch']}\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    steps_n = 3 if dry else args.steps
    micro = planned_micro_batch(dry)
    py = sys.executable
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry,
              "environment": environment(), "micro_batch": micro, "steps": []}
    tests = run_step("gpu_tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:randomly",
                                   "tests/test_gpu.py"], 240, out)
    log = (out / "gpu_tests.log").read_text().strip().splitlines()
    tests["summary"] = log[-1][:160] if log else ""
    report["steps"].append(tests)
    for name, extra in VARIANTS:
        if dry and name == "compiled":
            # the same path through engine.compile(), without inductor's C++ build on this CPU
            extra = ["--set", "compile=aot_eager"]
        report["steps"].append(run_step(
            name, [py, str(BENCH / "throughput.py"), *shape(dry), "--micro-batch", str(micro),
                   "--steps", str(steps_n), *extra], 60 if dry else 150, out))
    save = ["--preset", "neox-tiny", "--precision", "no", "--seq-len", "64", "--vocab-size",
            "256"] if dry else ["--preset", "neox-1.2b", "--precision", "bf16", "--seq-len",
                                "2048"]
    report["steps"].append(run_step(
        "save_stall", [py, str(BENCH / "save_bench.py"), "stall", *save, "--stages", "1",
                       "--rounds", "1", "--write-rounds", "1"], 60 if dry else 120, out))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table(report))
    print(table(report))
    failed = [s["step"] for s in report["steps"] if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
