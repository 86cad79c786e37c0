"""`neox-data prepare` against what HF users run,
`datasets.Dataset.map(tokenize, batched=True, num_proc=N)`: the same JSON-lines corpus, the same
tokenizer, the same cores, in one run.

    .venv/bin/python bench/prepare_bench.py [--mb 40] [--workers N] [--rounds 2]

The corpus: CPython's reference docs (builtin:pydoc) cut into paragraphs and repeated to --mb MB of
JSON lines. The tokenizer: a byte-level BPE of 8192 trained on it (tokenizer.json), loaded by HF as
PreTrainedTokenizerFast.
A: `neox-data prepare --input corpus.jsonl --tokenizer tokenizer.json --workers N` (JSON lines ->
   .npy shards).
B: `load_dataset("json", ...)` then `.map(lambda b: tok(b["text"]), batched=True, num_proc=N)` (JSON
   lines -> Arrow -> tokens in its Arrow cache); its map alone is reported too.
Each runs in its own process; A and B alternate (A B, B A, ...). Reported: tokens/s (the tokens of
the documents, without prepare's end-of-text tokens, so both count the same), wall seconds, and the
peak RSS of the process tree (sampled every 100 ms, the workers included). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from _harness import abba, emit, median

BIN = Path(sys.executable).parent

HF_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast
    corpus, tokenizer, workers, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer)
    started = time.perf_counter()
    ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    loaded = time.perf_counter()
    out = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=workers,
                 remove_columns=ds.column_names)
    done = time.perf_counter()
    tokens = sum(len(ids) for ids in out["input_ids"])
    print(json.dumps({"tokens": tokens, "load_s": loaded - started, "map_s": done - loaded}))
""")


def make_corpus(folder: Path, mb: int) -> tuple[Path, Path]:
    from neox_train.data.prepare import train_tokenizer
    from neox_train.data.sources import BUILTIN_CORPORA

    paragraphs = [p for d in BUILTIN_CORPORA["pydoc"]() for p in d.split("\n\n") if p.strip()]
    tokenizer = folder / "tokenizer.json"
    train_tokenizer(iter(paragraphs), 8192).save(str(tokenizer))
    corpus = folder / "corpus.jsonl"
    written = 0
    with open(corpus, "w") as f:
        while written < mb * 2**20:
            for p in paragraphs:
                line = json.dumps({"text": p}) + "\n"
                f.write(line)
                written += len(line)
    return corpus, tokenizer


def run_tree(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB of the process and all its children, stdout)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {cmd[:3]} failed: {proc.stderr.read()[-3000:]}")
    return wall, peak / 2**30, "".join(out)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    corpus, tokenizer = make_corpus(work, args.mb)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {"prepare": [], "datasets_map": []}
    for r, order in enumerate(abba(args.rounds, ["prepare", "datasets_map"])):
        for side in order:
            if side == "prepare":
                out = work / f"out{r}"
                wall, rss, stdout = run_tree([str(BIN / "neox-data"), "prepare", "--input",
                                              str(corpus), "--output", str(out), "--tokenizer",
                                              str(tokenizer), "--workers", str(args.workers),
                                              "--json"], env)
                summary = json.loads(stdout)
                # without the end-of-text tokens
                tokens = summary["num_tokens"] - summary["num_documents"]
                results[side].append({"wall_s": wall, "peak_rss_gib": rss, "tokens": tokens})
            else:
                wall, rss, stdout = run_tree([sys.executable, "-c", HF_SCRIPT, str(corpus),
                                              str(tokenizer), str(args.workers),
                                              str(work / f"hf-cache{r}")], env)
                summary = json.loads(stdout.strip().splitlines()[-1])
                results[side].append({"wall_s": wall, "peak_rss_gib": rss,
                                      "tokens": summary["tokens"], "load_s": summary["load_s"],
                                      "map_s": summary["map_s"]})
    ours, theirs = results["prepare"], results["datasets_map"]
    tps = {k: [r["tokens"] / r["wall_s"] for r in v] for k, v in results.items()}
    return {
        "corpus_mb": round(corpus.stat().st_size / 2**20, 1), "workers": args.workers,
        "rounds": args.rounds, "tokens": ours[0]["tokens"],
        "same_tokens": ours[0]["tokens"] == theirs[0]["tokens"],
        "prepare_tokens_per_s": median(tps["prepare"]),
        "datasets_map_tokens_per_s": median(tps["datasets_map"]),
        "datasets_map_only_tokens_per_s": median(r["tokens"] / r["map_s"] for r in theirs),
        "ratio": median(tps["prepare"]) / median(tps["datasets_map"]),
        "prepare_peak_rss_gib": max(r["peak_rss_gib"] for r in ours),
        "datasets_map_peak_rss_gib": max(r["peak_rss_gib"] for r in theirs), "runs": results,
        "goal": "ratio >= 1 with less peak memory",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=40, help="corpus size in MB of JSON lines")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neox-prepare-bench-") as tmp:
        result = measure(args, Path(tmp))
    result["goal_met"] = (result["ratio"] >= 1
                          and result["prepare_peak_rss_gib"] < result["datasets_map_peak_rss_gib"])
    emit({"bench": "prepare", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
