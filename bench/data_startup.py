"""Start-up on a large dataset: from launching neox-train to its first training step, and the memory
it takes.

    .venv/bin/python bench/data_startup.py [--tokens 2000000000] [--keep DIR]

Writes --tokens random uint16 tokens twice, as our .npy shards (8 files) and as one indexed dataset
(data.bin + data.idx, documents of 2,000 tokens), then starts `neox-train` (neox-demo at seq 512,
one step) on each:
- "cold": page cache dropped (when this process may write /proc/sys/vm/drop_caches) and no
  validation cache, so every token is read from disk and scanned once;
- "warm": the validation cache and the page cache from the cold run.
Seconds from launch to the line of step 1, and the peak RSS of the process (sampled every 50 ms),
against the same run on a 1M-token copy ("extra RSS"). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402

from _harness import emit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VOCAB = 50257


def write_shards(folder: Path, tokens: int, files: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = tokens // files
    for i in range(files):
        out = np.lib.format.open_memmap(folder / f"shard_{i:05d}.npy", mode="w+", dtype=np.uint16,
                                        shape=(per,))
        for start in range(0, per, 1 << 26):
            n = min(1 << 26, per - start)
            out[start:start + n] = rng.integers(0, VOCAB, size=n, dtype=np.uint16)
        out.flush()
        del out


def write_indexed(folder: Path, tokens: int, doc_tokens: int = 2000) -> None:
    from neox_train.data.indexed import write_index

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    with open(folder / "data.bin", "wb") as f:
        for start in range(0, tokens, 1 << 26):
            f.write(rng.integers(0, VOCAB, size=min(1 << 26, tokens - start),
                                 dtype=np.uint16).tobytes())
    sizes = np.full(tokens // doc_tokens, doc_tokens, dtype=np.int32)
    sizes[-1] += tokens - sizes.sum()
    write_index(folder / "data", np.uint16, sizes)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def start_up(data: Path, work: Path, name: str) -> dict[str, Any]:
    import psutil

    run = work / f"{name}.json"
    run.write_text(json.dumps(dict(
        model="neox-demo", seq_len=512, vocab_size=VOCAB, micro_batch=1, grad_accum=1,
        mixed_precision="no", ds_config="zero0", max_steps=1, warmup_steps=1, save_steps=1000,
        log_steps=1, eval_steps=0, keep_last_n=0, val_fraction=0.001, data_dir=str(data),
        save_dir=str(work / f"ckpt-{name}"), log_dir=str(work / f"logs-{name}"), async_save=False)))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    started = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "neox-train"), "--config", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=work)
    watched = psutil.Process(proc.pid)
    peak, first_step = 0, None
    lines: list[str] = []

    def read() -> None:
        nonlocal first_step
        for line in proc.stderr:
            lines.append(line)
            if first_step is None and "step 1:" in line:
                first_step = time.perf_counter() - started

    import threading

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    reader.join(timeout=10)
    if proc.returncode != 0 or first_step is None:
        raise SystemExit(f"bench: neox-train on {data} failed:\n{''.join(lines[-30:])}")
    return {"first_step_s": first_step, "peak_rss_gib": peak / 2**30}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sets = {k: work / k for k in args.only}
    t = time.perf_counter()
    if "shards" in sets:
        write_shards(sets["shards"], args.tokens)
    if "indexed" in sets:
        write_indexed(sets["indexed"], args.tokens)
    small = work / "small"
    write_shards(small, 1_000_000, files=1)
    made_s = time.perf_counter() - t
    baseline = start_up(small, work, "baseline")
    out: dict[str, Any] = {"tokens": args.tokens, "write_s": made_s, "baseline": baseline}
    for kind, folder in sets.items():
        for cache in folder.glob(".neox-validated.json"):
            cache.unlink()
        dropped = False if args.keep_page_cache else drop_page_cache()
        cold = start_up(folder, work, f"{kind}-cold")
        warm = start_up(folder, work, f"{kind}-warm")
        out[kind] = {"page_cache_dropped": dropped, "cold": cold, "warm": warm,
                     "extra_rss_gib_cold": cold["peak_rss_gib"] - baseline["peak_rss_gib"],
                     "extra_rss_gib_warm": warm["peak_rss_gib"] - baseline["peak_rss_gib"]}
    out["goal"] = "first step under 10 s, extra RSS under 1 GiB"
    out["goal_met"] = all(out[k][c]["first_step_s"] < 10 and out[k][f"extra_rss_gib_{c}"] < 1
                          for k in sets for c in ("cold", "warm"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2_000_000_000)
    p.add_argument("--only", nargs="+", choices=("shards", "indexed"),
                   default=["shards", "indexed"], help="which formats to measure (default both)")
    p.add_argument("--keep-page-cache", action="store_true",
                   help="do not drop the page cache for the cold runs")
    p.add_argument("--keep", metavar="DIR",
                   help="write the datasets here and keep them (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        emit({"bench": "data_startup", **measure(args, Path(args.keep))})
        return 0
    with tempfile.TemporaryDirectory(prefix="neox-startup-") as tmp:
        emit({"bench": "data_startup", **measure(args, Path(tmp))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
