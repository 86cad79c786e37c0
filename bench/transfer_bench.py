"""Transfers to and from a bucket whose every connection is capped, as one TCP stream from a VM to
GCS is: ours (parallel composite uploads, sliced downloads) against one stream (a single resumable
upload or download, the path before issue 22) and against google-cloud-storage's transfer_manager,
at several stream counts, alternating, each measured within this one run.

    .venv/bin/python bench/transfer_bench.py [--mb 256] [--cap-mb-s 8] [--streams 1,4,8,16]
        [--rounds 2] [--sections big,checkpoint,preemption]

The bucket: gcp-storage-emulator on loopback behind one FaultProxy that enforces generation
preconditions and caps every connection at --cap-mb-s in each direction (tests/gcs.py). The server
itself serves one request at a time; its ceiling is measured first, uncapped, and reported, so a
figure near it is read as the server's, not the client's.

Every transfer runs in a client process of its own (this script with --client), so its CPU time
(user + system, per GB moved) is the client's alone, and the proxy's threads never share its GIL.

1. big: one big file (--mb), up and down, at each stream count N:
   - ours: GcsBackend.upload_file / download_file with a stream budget of N;
   - one stream: the same with N = 1;
   - transfer_manager: download_chunks_concurrently (ranged reads, max_workers=N, threads). For
     uploads, upload_chunks_concurrently needs the XML multipart API, which the test server lacks,
     so its stand-in is upload_many_from_filenames, which sends one file in one stream whatever N.
   Reported: median MB/s of each, and ratios ours / one stream and ours / transfer_manager (median
   of the per-round ratios, with min and max).
2. checkpoint: one real checkpoint folder (neox-train, the demo's shape at ZeRO-0: one 63 MB file
   and small ones), up and down: ours (sync_up / sync_down) against transfer_manager's
   upload_many_from_filenames / download_many_to_path, same N.
3. preemption: the demo trains publishing to the capped bucket (--preemption-cap-mb-s, default 1
   MB/s: one stream needs ~63 s for the checkpoint), SIGTERM after a few steps, preemption_grace_s
   15: was the checkpoint published in time, and where the seconds went (the exit summary's
   phases), with --transfer-streams 16 and 1.
4. faults: the demo publishes and a fresh save dir resumes from the bucket while parts, composes
   and ranged reads get 503s, resets and stalls: objects that differ from their file, parts left,
   tags COMPLETE that are not (all must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import abba, emit, synthetic_shards

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
BIN = Path(sys.executable).parent
MB = 1e6


# -- the client process -------------------------------------------------------------------------

def _client(args: list[str]) -> None:
    """--client DIRECTION METHOD STREAMS BUCKET NAME PATH: one transfer; prints seconds and CPU."""
    direction, method, streams, bucket, name, path = args
    n, path = int(streams), Path(path)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    from neox_train.remote import open_backend
    from neox_train.remote.rsync import sync_down, sync_up

    rss0 = _rss_mb()
    started, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    moved = 0
    if method in ("ours", "one"):
        backend = open_backend(f"gs://{bucket}", streams=n if method == "ours" else 1,
                               parts_journal=path.parent / "parts-journal.jsonl")
        if direction == "up" and path.is_dir():
            moved = sync_up(path, backend, name, workers=n).bytes_uploaded
        elif direction == "up":
            moved = backend.upload_file(path, name, crc32c=None, generation=None).size
        elif name.endswith("/"):
            moved = sync_down(backend, name, path, workers=n, skip_existing=False).bytes_downloaded
        else:
            backend.download_file(name, path)
            moved = path.stat().st_size
    else:
        client = storage.Client(project="bench", credentials=AnonymousCredentials())
        b = client.bucket(bucket)
        if direction == "up":
            # upload_many_from_filenames's core: (file, blob) pairs, max_workers at once
            pairs = ([(str(f), b.blob(f"{name}/{f.relative_to(path).as_posix()}"))
                      for f in sorted(path.rglob("*")) if f.is_file()]
                     if path.is_dir() else [(str(path), b.blob(name))])
            transfer_manager.upload_many(pairs, max_workers=n, worker_type="thread",
                                         raise_exception=True)
            moved = sum(Path(f).stat().st_size for f, _ in pairs)
        elif name.endswith("/"):
            names = [blob.name[len(name):] for blob in client.list_blobs(bucket, prefix=name)]
            transfer_manager.download_many_to_path(
                b, names, destination_directory=str(path), blob_name_prefix=name, max_workers=n,
                worker_type="thread", raise_exception=True)
            moved = sum((path / f).stat().st_size for f in names)
        else:
            transfer_manager.download_chunks_concurrently(
                b.blob(name), str(path), max_workers=n, worker_type="thread", crc32c_checksum=True)
            moved = path.stat().st_size
    seconds = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    sys.__stdout__.write(json.dumps({"seconds": seconds, "bytes": moved, "cpu_s": cpu,
                                     "added_rss_mb": max(0.0, _rss_mb("VmHWM") - rss0)})
                     + "\n")


def _rss_mb(key: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS), or its peak (VmHWM). Not ru_maxrss: Linux
    carries the parent's peak across fork and exec into it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def transfer(env: dict, direction: str, method: str, streams: int, bucket: str, name: str,
             path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--client", direction, method, str(streams),
                           bucket, name, str(path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: {method} {direction} x{streams} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.splitlines()[-1])
    out["mb_s"] = out["bytes"] / MB / out["seconds"]
    return out


# -- the measurements ---------------------------------------------------------------------------

def _ratio_stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def server_ceiling(emulator, tmp: Path, big: Path, bucket: str) -> dict:
    """The server's own limit: the big file up and down at 16 streams through an uncapped proxy."""
    from gcs import FaultProxy, direct_client

    with FaultProxy(emulator.emulator_url, enforce_preconditions=True, lifetime_s=None,
                    max_requests=None, keep_log=False) as proxy:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url}
        up = transfer(env, "up", "ours", 16, bucket, "ceiling.bin", big)
        down = transfer(env, "down", "ours", 16, bucket, "ceiling.bin", tmp / "ceiling.out")
    (tmp / "ceiling.out").unlink()
    direct_client(emulator.emulator_url).bucket(bucket).delete_blob("ceiling.bin")
    return {"up_mb_s": round(up["mb_s"], 1), "down_mb_s": round(down["mb_s"], 1)}


def big_file(env: dict, tmp: Path, big: Path, bucket: str, streams: list[int],
             rounds: int, drop) -> dict:
    """Section 1. The download source is one object uploaded once (by ours)."""
    transfer(env, "up", "ours", max(streams), bucket, "source.bin", big)
    runs: dict[str, list[dict]] = {}
    for r, order in enumerate(abba(rounds, ["ours", "one", "tm"])):
        for n in (streams if r % 2 == 0 else streams[::-1]):
            for method in order:
                if method == "one" and n != streams[0]:
                    continue  # one stream is one stream: measured once per round
                for direction in ("up", "down"):
                    if method == "tm" and direction == "up" and n != streams[0]:
                        continue  # upload_many sends one file in one stream whatever N: once
                    out = tmp / "down.bin"
                    if direction == "up":
                        result = transfer(env, "up", method, n, bucket, "up.bin", big)
                        drop("up.bin")  # the test server keeps objects in memory
                    else:
                        result = transfer(env, "down", method, n, bucket, "source.bin", out)
                        out.unlink()
                    runs.setdefault(f"{method} {direction} {n}", []).append(result)
                    print(f"bench: round {r}: {method} {direction} x{n}: "
                          f"{result['mb_s']:.1f} MB/s", file=sys.stderr)
    table = {}
    for n in streams:
        for direction in ("up", "down"):
            ours = runs[f"ours {direction} {n}"]
            one = runs[f"one {direction} {streams[0]}"]
            tm = runs[f"tm {direction} {n if direction == 'down' else streams[0]}"]
            table[f"{direction} x{n}"] = {
                "ours_mb_s": round(statistics.median(x["mb_s"] for x in ours), 1),
                "one_stream_mb_s": round(statistics.median(x["mb_s"] for x in one), 1),
                "transfer_manager_mb_s": round(statistics.median(x["mb_s"] for x in tm), 1),
                "ours_over_one_stream": _ratio_stats(
                    [a["mb_s"] / b["mb_s"] for a, b in zip(ours, one)]),
                "ours_over_transfer_manager": _ratio_stats(
                    [a["mb_s"] / b["mb_s"] for a, b in zip(ours, tm)]),
                "ours_cpu_s_per_gb": round(statistics.median(
                    x["cpu_s"] / (x["bytes"] / 1e9) for x in ours), 2),
                # the most memory one transfer added to its process (imports excluded)
                "ours_added_rss_mb": round(max(x["added_rss_mb"] for x in ours)),
            }
    return table


def demo_run(tmp: Path, name: str, data: Path, **values) -> Path:
    config = tmp / f"{name}.json"
    config.write_text(json.dumps({
        "base": "demo", "data_dir": str(data), "save_dir": str(tmp / f"ckpt-{name}"),
        "log_dir": str(tmp / f"logs-{name}"), "eval_steps": 0, "log_steps": 1, **values}))
    return config


def checkpoint_folder(env: dict, tmp: Path, data: Path, bucket: str, n: int, rounds: int) -> dict:
    """Section 2: one real checkpoint (the demo's shape at ZeRO-0) up and down."""
    config = demo_run(tmp, "folder", data, max_steps=1, save_steps=1, sync_to=None)
    proc = subprocess.run([str(BIN / "neox-train"), "--config", str(config)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: the demo run failed:\n{proc.stderr[-3000:]}")
    folder = tmp / "ckpt-folder" / "global_step1"
    runs: dict[str, list[dict]] = {}
    for r, order in enumerate(abba(rounds, ["ours", "tm"])):
        for method in order:
            prefix = f"ckpt-{method}-{r}"
            runs.setdefault(f"{method} up", []).append(
                transfer(env, "up", method, n, bucket, prefix, folder))
            out = tmp / f"back-{method}-{r}"
            runs.setdefault(f"{method} down", []).append(
                transfer(env, "down", method, n, bucket, f"{prefix}/", out))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    out = {"files": sum(1 for p in folder.rglob("*") if p.is_file()), "mb": round(size / MB, 1),
           "streams": n}
    for direction in ("up", "down"):
        ours, tm = runs[f"ours {direction}"], runs[f"tm {direction}"]
        out[direction] = {
            "ours_mb_s": round(statistics.median(x["mb_s"] for x in ours), 1),
            "transfer_manager_mb_s": round(statistics.median(x["mb_s"] for x in tm), 1),
            "ours_over_transfer_manager": _ratio_stats(
                [a["mb_s"] / b["mb_s"] for a, b in zip(ours, tm)])}
    return out


def preemption(env: dict, tmp: Path, data: Path, emulator, cap: float, streams: int) -> dict:
    """Section 3: SIGTERM while training publishes to a bucket capped at `cap` bytes/s."""
    from gcs import FaultProxy, create_bucket

    with FaultProxy(emulator.emulator_url, enforce_preconditions=True, cap_bytes_per_s=cap,
                    lifetime_s=None, max_requests=None, keep_log=False) as proxy:
        env = {**env, "STORAGE_EMULATOR_HOST": proxy.url}
        bucket = create_bucket(emulator.emulator_url)
        config = demo_run(tmp, f"preempt-{streams}", data, max_steps=100_000, save_steps=100_000,
                          sync_to=f"gs://{bucket}/demo", preemption_grace_s=15,
                          transfer_streams=streams)
        proc = subprocess.Popen([str(BIN / "neox-train"), "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        metrics = tmp / f"logs-preempt-{streams}" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().count('"train"') >= 3):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: the preemption run did not train:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        exited = time.monotonic() - sent
    done = next((line for line in err.splitlines() if " done: {" in line), None)
    summary = json.loads(done.split(" done: ", 1)[1]) if done else {}
    pre = summary.get("preemption") or {}
    ckpt = tmp / f"ckpt-preempt-{streams}" / str(pre.get("tag"))
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) if ckpt.is_dir() else 0
    return {"streams": streams, "cap_mb_s": cap / MB, "checkpoint_mb": round(size / MB, 1),
            "exit_after_signal_s": round(exited, 2),
            "published": pre.get("published"), "seconds_used": pre.get("seconds_used"),
            "phases_s": pre.get("phases_s"), "budget_s": pre.get("budget_s"),
            "tag": pre.get("tag")}


# what the fault mix hits: parts (their resumable starts and chunks), composes, ranged reads
FAULTY = (r"POST /upload/storage/v1/b/[^/]+/o\?.*uploadType=resumable",
          r"PUT /upload/storage/v1/b/[^/]+/o\?.*upload_id=",
          r"POST /storage/v1/b/[^/]+/o/.+/compose",
          r"GET /download/storage/v1/b/[^/]+/o/.+generation=")


def faults(env: dict, tmp: Path, data: Path, emulator) -> dict:
    """Section 4: the demo publishes two checkpoints through a proxy that answers 503, resets or
    stalls one in two of the requests above, then a fresh save dir resumes from the bucket (sliced
    downloads under the same mix) and publishes one more. Then, asked of the server itself: every
    COMPLETE tag's objects have the manifest's crc32c, every local file too, and no part is left."""
    from neox_train.remote.files import crc32c_of_file

    from gcs import FaultProxy, create_bucket, direct_client

    mix = ["503", "pass", "reset", "pass", "stall", "pass"] * 40
    with FaultProxy(emulator.emulator_url, enforce_preconditions=True, stall_s=1.0,
                    rules={pattern: mix for pattern in FAULTY}, lifetime_s=None,
                    max_requests=None, keep_log=False) as proxy:
        env = {**env, "STORAGE_EMULATOR_HOST": proxy.url}
        bucket = create_bucket(emulator.emulator_url)
        url = f"gs://{bucket}/demo"
        seconds = {}
        for name, steps in (("faults", 4), ("faults-resumed", 6)):
            started = time.monotonic()
            config = demo_run(tmp, name, data, max_steps=steps, save_steps=2, keep_last_n=0,
                              sync_to=url)
            proc = subprocess.run([str(BIN / "neox-train"), "--config", str(config), "--resume",
                                   "auto"], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"bench: the run under faults failed:\n{proc.stderr[-3000:]}")
            seconds[name] = round(time.monotonic() - started, 1)
        injected = {k: proxy.counts[k] for k in ("503", "reset", "stall")}
    client = direct_client(emulator.emulator_url)
    objects = {b.name: b for b in client.list_blobs(bucket, prefix="demo/")}
    complete = sorted(n.split("/")[1] for n in objects if n.endswith("/COMPLETE"))
    bad, checked = [], 0
    for tag in complete:
        # a fresh blob: a listed one downloads from its stored mediaLink, the proxy's address
        manifest = json.loads(client.bucket(bucket).blob(f"demo/{tag}/manifest.json")
                              .download_as_bytes())
        for rel, meta in manifest["files"].items():
            checked += 1
            blob = objects.get(f"demo/{tag}/{rel}")
            local = next((f for f in (tmp / "ckpt-faults" / tag / rel,
                                      tmp / "ckpt-faults-resumed" / tag / rel) if f.is_file()),
                         None)
            if (blob is None or blob.crc32c != meta["crc32c"]
                    or (local is not None and crc32c_of_file(local) != meta["crc32c"])):
                bad.append(f"{tag}/{rel}")
    return {"faults_injected": injected, "run_seconds": seconds, "complete_tags": complete,
            "files_checked": checked,
            "objects_differing_from_their_file": len(bad), "differing": bad[:5],
            "parts_left": sum(1 for n in objects if "/.neox-parts/" in n)}


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    from gcs import Emulator, FaultProxy, create_bucket, direct_client

    streams = [int(s) for s in args.streams.split(",")]
    sections = set(args.sections.split(","))
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        for _ in range(args.mb):
            f.write(os.urandom(1 << 20))
    emulator = Emulator(enforce_preconditions=False)
    try:
        bucket = create_bucket(emulator.emulator_url)
        client = direct_client(emulator.emulator_url)
        result: dict = {"mb": round(big.stat().st_size / MB, 1), "cap_mb_s": args.cap_mb_s,
                        "streams": streams, "rounds": args.rounds}
        if "big" in sections:
            result["server_ceiling"] = server_ceiling(emulator, tmp, big, bucket)
        if sections & {"checkpoint", "preemption", "faults"}:
            data = synthetic_shards(tmp / "data", vocab_size=4096, num_tokens=400_000)
        with FaultProxy(emulator.emulator_url, enforce_preconditions=True,
                        cap_bytes_per_s=args.cap_mb_s * MB, lifetime_s=None, max_requests=None,
                        keep_log=False) as proxy:
            env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url,
                   "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
            if "big" in sections:
                result["big_file"] = big_file(
                    env, tmp, big, bucket, streams, args.rounds,
                    lambda name: client.bucket(bucket).delete_blob(name))
            big.unlink()
            if "checkpoint" in sections:
                result["checkpoint"] = checkpoint_folder(env, tmp, data, bucket, max(streams),
                                                         args.rounds)
        if "faults" in sections:
            result["faults"] = faults({**os.environ, "PYTHONPATH": str(REPO)}, tmp, data,
                                      emulator)
        if "preemption" in sections:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            result["preemption"] = [
                preemption(env, tmp, data, emulator, args.preemption_cap_mb_s * MB, n)
                for n in (16, 1)]
    finally:
        emulator.stop()
    return result


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        _client(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=256, help="size of the big file (MiB)")
    p.add_argument("--cap-mb-s", type=float, default=8.0,
                   help="bytes per second per connection, in MB/s (default 8)")
    p.add_argument("--streams", default="1,4,8,16", help="stream counts, the first is the "
                   "baseline's (default 1,4,8,16)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sections", default="big",
                   help="comma-separated: big (one big file), checkpoint (a real checkpoint "
                        "folder), preemption (SIGTERM while publishing the demo's checkpoint), "
                        "faults (publish and resume under a 503/reset/stall mix)")
    p.add_argument("--preemption-cap-mb-s", type=float, default=1.0)
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="neox-transfer-bench-") as tmp:
        result = measure(args, Path(tmp))
    emit({"bench": "transfer_bench", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
