"""Checkpoint sync benchmarks on CPU, each measured within one run of this script.

    .venv/bin/python bench/sync_bench.py [--steps 24] [--save-steps 4] [--json]

1. Checkpoint stall: the same short training run twice, without sync and with background sync to a GCS API
   server (gcp-storage-emulator on loopback), comparing the mean time the loop spent inside save
   (`checkpoint/stall_s` in metrics.jsonl). Goal: sync-on / sync-off <= 1.05.
2. Upload throughput: the same checkpoint folder uploaded to the emulator by our `sync_up` and by
   google-cloud-storage's `transfer_manager.upload_many_from_filenames` (same worker count), MB/s each.
   Goal: ours / theirs >= 1.0. The emulator serves one request at a time, so this compares client overhead,
   not network parallelism.
Needs the demo data (`neox-data prepare --input builtin:pydoc --output data/demo --vocab-size 4096`).
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def train(tmp: Path, name: str, steps: int, save_steps: int, sync_to: str | None, env: dict) -> list[float]:
    args = [
        str(BIN / "neox-train"), "--config", "demo", "--max-steps", str(steps), "--save-steps", str(save_steps),
        "--eval-steps", "0", "--log-steps", str(save_steps), "--save-dir", str(tmp / f"ckpt-{name}"),
        "--log-dir", str(tmp / f"logs-{name}"),
    ]
    run_config = tmp / f"{name}.json"
    run_config.write_text(json.dumps({"base": "demo", "sync_to": sync_to, "keep_last_n": 0}))
    args[2] = str(run_config)
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench: training ({name}) failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(l) for l in (tmp / f"logs-{name}" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "checkpoint"]


def upload_throughput(folder: Path, workers: int) -> dict:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    from neox_train.storage import open_backend
    from neox_train.sync import sync_up

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    client = storage.Client(project="bench", credentials=AnonymousCredentials())
    client.create_bucket("bench-ours")
    theirs_bucket = client.create_bucket("bench-theirs")

    t0 = time.perf_counter()
    result = sync_up(folder, open_backend("gs://bench-ours/run"), "ckpt", workers=workers)
    ours_s = time.perf_counter() - t0
    assert result.bytes_uploaded == total, (result, total)

    names = [p.relative_to(folder).as_posix() for p in files]
    t0 = time.perf_counter()
    outcomes = transfer_manager.upload_many_from_filenames(
        theirs_bucket, names, source_directory=str(folder), blob_name_prefix="run/ckpt/", max_workers=workers,
        worker_type=transfer_manager.THREAD, raise_exception=True,
    )
    theirs_s = time.perf_counter() - t0
    assert all(o is None for o in outcomes)
    return {
        "files": len(files), "bytes": total, "workers": workers,
        "ours_mb_s": total / ours_s / 1e6, "transfer_manager_mb_s": total / theirs_s / 1e6,
        "ours_over_transfer_manager": theirs_s / ours_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from gcs import Emulator  # tests/gcs.py: the same emulator the tests use

    emulator = Emulator()
    try:
        result = measure(args, emulator.url)
    finally:
        emulator.stop()
    if args.json:
        print(json.dumps(result))
    else:
        stall, throughput = result["checkpoint_stall"], result["upload_throughput"]
        print(f"checkpoint stall: {stall['off_mean_s']:.3f} s without sync, {stall['on_mean_s']:.3f} s with background "
              f"sync ({stall['on_over_off']:.3f}x, {stall['saves']} saves)", file=sys.stderr)
        print(f"upload: ours {throughput['ours_mb_s']:.1f} MB/s, transfer_manager {throughput['transfer_manager_mb_s']:.1f} "
              f"MB/s ({throughput['ours_over_transfer_manager']:.2f}x) for {throughput['files']} files, "
              f"{throughput['bytes'] / 1e6:.1f} MB", file=sys.stderr)
    return 0


def measure(args, emulator_url: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "STORAGE_EMULATOR_HOST": emulator_url}
        os.environ["STORAGE_EMULATOR_HOST"] = emulator_url
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="bench", credentials=AnonymousCredentials()).create_bucket("bench-train")
        off = train(tmp, "off", args.steps, args.save_steps, None, env)
        on = train(tmp, "on", args.steps, args.save_steps, "gs://bench-train/demo", env)
        off_s, on_s = [r["stall_s"] for r in off], [r["stall_s"] for r in on]
        stall = {
            "saves": len(on), "off_mean_s": statistics.mean(off_s), "on_mean_s": statistics.mean(on_s),
            "on_over_off": statistics.mean(on_s) / statistics.mean(off_s),
            # The trainer-side cost of handing a checkpoint to the worker (journal line + pipe message); the rest
            # of any difference is the worker and the GCS server competing for the same cores and disk.
            "on_submit_mean_s": statistics.mean(r["submit_s"] for r in on), "off_s": off_s, "on_s": on_s,
        }
        last = max((tmp / "ckpt-off").glob("global_step*"), key=lambda q: int(q.name[11:]))
        throughput = upload_throughput(last, args.workers)
    return {"checkpoint_stall": stall, "upload_throughput": throughput}


if __name__ == "__main__":
    sys.exit(main())
