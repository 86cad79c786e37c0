"""Checkpoint sync benchmarks on CPU, each measured within one run of this script.

    .venv/bin/python bench/sync_bench.py [--steps 24] [--save-steps 4] [--json]

1. Checkpoint stall: the same short training run, alternately without sync and with background sync
   to a GCS API server (gcp-storage-emulator on loopback), `--rounds` times each, comparing the
   median time the loop spent inside save (`checkpoint/stall_s` in metrics.jsonl). Goal: sync-on /
   sync-off <= 1.05. The emulator runs niced: in production the server is Google's, not a process on
   the training machine's cores.
2. Upload throughput: the same checkpoint folder uploaded to the emulator by our `sync_up` (listing,
   crc32c, skip check, upload, verification listing) and by google-cloud-storage's
   `transfer_manager.upload_many_from_filenames` (upload only), same worker count, alternating which
   goes first, `--upload-rounds` times; the median of the per-round ratios. Goal: ours / theirs >=
   1.0. The emulator serves one request at a time, so this compares client overhead, not network
   parallelism.
Needs the demo data
(`neox-data prepare --input builtin:pydoc --output data/demo --vocab-size 4096`).
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


def train(tmp: Path, name: str, steps: int, save_steps: int, sync_to: str | None,
          env: dict) -> list[float]:
    args = [
        str(BIN / "neox-train"), "--config", "demo", "--max-steps", str(steps), "--save-steps",
        str(save_steps), "--eval-steps", "0", "--log-steps", str(save_steps), "--save-dir",
        str(tmp / f"ckpt-{name}"), "--log-dir", str(tmp / f"logs-{name}"),
    ]
    run_config = tmp / f"{name}.json"
    run_config.write_text(json.dumps({"base": "demo", "sync_to": sync_to, "keep_last_n": 0}))
    args[2] = str(run_config)
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench: training ({name}) failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line)
               for line in (tmp / f"logs-{name}" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "checkpoint"]


def upload_throughput(folder: Path, workers: int, rounds: int) -> dict:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    from neox_train.remote import open_backend
    from neox_train.remote.rsync import sync_up

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    client = storage.Client(project="bench", credentials=AnonymousCredentials())
    client.create_bucket("bench-ours")
    theirs_bucket = client.create_bucket("bench-theirs")

    names = [p.relative_to(folder).as_posix() for p in files]

    def ours(i: int) -> float:
        t0 = time.perf_counter()
        # A fresh cache each round, as for a just-saved checkpoint: every file is read and hashed.
        result = sync_up(folder, open_backend(f"gs://bench-ours/run{i}"), "ckpt", workers=workers)
        assert result.bytes_uploaded == total, (result, total)
        return time.perf_counter() - t0

    def theirs(i: int) -> float:
        t0 = time.perf_counter()
        outcomes = transfer_manager.upload_many_from_filenames(
            theirs_bucket, names, source_directory=str(folder), blob_name_prefix=f"run{i}/ckpt/",
            max_workers=workers, worker_type=transfer_manager.THREAD, raise_exception=True,
        )
        assert all(o is None for o in outcomes)
        return time.perf_counter() - t0

    ours_s, theirs_s = [], []
    for i in range(rounds):
        # Alternate the order, so neither side always runs on a warmer cache or a quieter machine.
        if i % 2 == 0:
            ours_s.append(ours(i))
            theirs_s.append(theirs(i))
        else:
            theirs_s.append(theirs(i))
            ours_s.append(ours(i))
    ratios = [t / o for o, t in zip(ours_s, theirs_s)]
    return {
        "files": len(files), "bytes": total, "workers": workers, "rounds": rounds,
        "ours_mb_s": total / statistics.median(ours_s) / 1e6,
        "transfer_manager_mb_s": total / statistics.median(theirs_s) / 1e6,
        "ours_over_transfer_manager": statistics.median(ratios), "ratios": ratios,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2,
                   help="training runs per side (alternating off, on, off, on, ...)")
    p.add_argument("--upload-rounds", type=int, default=9)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from gcs import Emulator  # tests/gcs.py: the same emulator the tests use

    emulator = Emulator(nice=10)
    try:
        result = measure(args, emulator.url)
    finally:
        emulator.stop()
    if args.json:
        print(json.dumps(result))
    else:
        stall, throughput = result["checkpoint_stall"], result["upload_throughput"]
        print(f"checkpoint stall (median): {stall['off_median_s']:.3f} s without sync, "
              f"{stall['on_median_s']:.3f} s with background sync ({stall['on_over_off']:.3f}x, "
              f"{stall['saves']} saves per side)", file=sys.stderr)
        print(f"upload: ours {throughput['ours_mb_s']:.1f} MB/s, transfer_manager "
              f"{throughput['transfer_manager_mb_s']:.1f} MB/s (median ratio "
              f"{throughput['ours_over_transfer_manager']:.2f}x over {throughput['rounds']} "
              f"rounds) for {throughput['files']} files, "
              f"{throughput['bytes'] / 1e6:.1f} MB", file=sys.stderr)
    return 0


def measure(args, emulator_url: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
               "STORAGE_EMULATOR_HOST": emulator_url}
        os.environ["STORAGE_EMULATOR_HOST"] = emulator_url
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="bench",
                       credentials=AnonymousCredentials()).create_bucket("bench-train")
        off_s: list[float] = []
        on_s: list[float] = []
        on_submit: list[float] = []
        for i in range(args.rounds):
            for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                records = train(tmp, f"{name}{i}", args.steps, args.save_steps,
                                None if name == "off" else f"gs://bench-train/demo{i}", env)
                (off_s if name == "off" else on_s).extend(r["stall_s"] for r in records)
                if name == "on":
                    on_submit.extend(r["submit_s"] for r in records)
        stall = {
            "saves": len(on_s), "off_median_s": statistics.median(off_s),
            "on_median_s": statistics.median(on_s),
            "on_over_off": statistics.median(on_s) / statistics.median(off_s),
            "on_over_off_mean": statistics.mean(on_s) / statistics.mean(off_s),
            # The trainer-side cost of handing a checkpoint to the worker (journal line + pipe
            # message); the rest of any difference is the worker and the GCS server competing for
            # the same cores and disk.
            "on_submit_median_s": statistics.median(on_submit), "off_s": off_s, "on_s": on_s,
        }
        last = max((tmp / "ckpt-off0").glob("global_step*"), key=lambda q: int(q.name[11:]))
        throughput = upload_throughput(last, args.workers, args.upload_rounds)
    return {"checkpoint_stall": stall, "upload_throughput": throughput}


if __name__ == "__main__":
    sys.exit(main())
