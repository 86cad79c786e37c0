"""What a checkpoint costs the training loop, asynchronous against synchronous, measured in one
process.

    python bench/save_bench.py stall [--preset neox-410m] [--stages 0,2] [--rounds 2]
        Loop-blocked seconds per save (checkpoint/stall_s), async over sync, per ZeRO stage. A
        synchronous save's write GB/s over `dd bs=32M oflag=direct conv=fsync` of the same size on
        the same folder: --write-rounds pairs in alternating order, median and range of the
        per-round ratios. Training tokens/s with a save every --block steps: async against sync
        against no saves, interleaved blocks.
    python bench/save_bench.py agree [--calls 2000]
        The per-step agreement of two ranks (a gloo sum of two integers): microseconds per step.
    python bench/save_bench.py preempt [--preset neox-demo] [--sync-to gs]
        A real `neox-train` sent SIGTERM after a few steps: seconds to "complete locally" and to
        "published" (a GCS emulator), from the run's own preemption summary.

Each prints one JSON line (bench/_harness.py). CPU figures are ratios within one run; absolute GB/s
and tokens/s belong to the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h

REPO = Path(__file__).resolve().parent.parent


def dd_write_gb_s(folder: Path, nbytes: int) -> float:
    """Sequential write bandwidth of the disk under `folder`: dd with O_DIRECT and a final fsync, 32
    MiB blocks."""
    count = max(8, nbytes // (32 << 20))
    path = folder / "dd.bin"
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=32M", f"count={count}", "oflag=direct",
                    "conv=fsync"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - started
    path.unlink()
    return count * (32 << 20) / 1e9 / seconds


def _checkpoint_records(log_dir: Path) -> list[dict[str, Any]]:
    path = log_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "checkpoint"]


def _deepspeed_default_save(trainer) -> float:
    """The synchronous save as it was before our engine, the baseline the stall is compared with:
    DeepSpeed's TorchCheckpointEngine (torch.save to a path), then the local commit hashing every
    file. Not a save path of neox-train (that is checkpoint.local.saver only): the reference it is
    measured against. The seconds it blocks.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from neox_train.checkpoint.local import commit, train_state
    from neox_train.checkpoint.local.tags import tag_for_step

    ours = trainer.engine.checkpoint_engine
    trainer.engine.checkpoint_engine = TorchCheckpointEngine(trainer.engine._config)
    try:
        started = time.perf_counter()
        plan = trainer.plan
        state = train_state.TrainState(trainer.step, trainer.loader.consumed_samples)
        extra = train_state.client_state(state=state, run_config=plan.run.to_dict(),
                                         ds_config=plan.ds_config,
                                         model_config=plan.model_config.to_dict(),
                                         dp_size=plan.dp_size,
                                         data_tokens=trainer.windows.num_tokens)
        tag = tag_for_step(state.step)
        train_state.prepare_tag(trainer.save_dir, tag)
        trainer.engine.save_checkpoint(str(trainer.save_dir), tag=tag, client_state=extra,
                                       save_latest=False)
        train_state.write_side_files(trainer.save_dir / tag, extra, run_id=None, losses=None)
        commit.commit(trainer.save_dir, tag, run_id=None)
        return time.perf_counter() - started
    finally:
        trainer.engine.checkpoint_engine = ours


def _stall_for_stage(scratch: Path, args, stage: int) -> dict[str, Any]:
    data = h.synthetic_shards(scratch / "data", vocab_size=args.vocab_size, num_tokens=200_000)
    save_dir, log_dir = scratch / f"ckpt{stage}", scratch / f"logs{stage}"
    session = h.build_session(dict(
        model=args.preset, seq_len=args.seq_len, vocab_size=args.vocab_size, micro_batch=1,
        grad_accum=1, mixed_precision=args.precision, ds_config=f"zero{stage}", max_steps=100_000,
        save_steps=100_000, log_steps=100_000, eval_steps=0, keep_last_n=1, val_fraction=0.01,
        data_dir=str(data), save_dir=str(save_dir), log_dir=str(log_dir), async_save=True))
    trainer = session.trainer
    try:
        if not trainer.checkpoints.saver.asynchronous:
            raise SystemExit("bench: asynchronous saves fell back to synchronous (host memory); "
                             "nothing to compare")
        step = lambda n=1: trainer.train(until_step=trainer.step + n, final=False)  # noqa: E731
        step()
        # The first asynchronous save allocates (and first touches) the host buffers every later
        # save reuses: reported on its own, not mixed into the steady state.
        trainer.save(asynchronous=True)
        step()
        trainer.checkpoints.drain()
        first_async = _checkpoint_records(log_dir)[-1]["stall_s"]
        stalls: dict[str, list[float]] = {"deepspeed": [], "sync": [], "async": []}
        writes: dict[str, list[float]] = {"sync": [], "async": []}
        for order in h.abba(args.rounds, ["deepspeed", "sync", "async"]):
            for mode in order:
                step()
                if mode == "deepspeed":
                    stalls[mode].append(_deepspeed_default_save(trainer))
                    continue
                trainer.save(asynchronous=mode == "async")
                step()  # an asynchronous save is written while this step trains
                # isolate the variants: the next one starts on an idle disk
                trainer.checkpoints.drain()
                rec = _checkpoint_records(log_dir)[-1]
                stalls[mode].append(rec["stall_s"])
                writes[mode].append(rec["gb_per_s"])
        # The disk's speed drifts on these VMs (1.1 to 2.7 GB/s within the hour): each round pairs
        # dd with a synchronous save, in alternating order, and the ratio is taken per round.
        size = _checkpoint_records(log_dir)[-1]["bytes"]
        dds, paired = [], []
        for order in h.abba(args.write_rounds, ["dd", "save"]):
            for what in order:
                if what == "dd":
                    dds.append(dd_write_gb_s(save_dir, int(size)))
                    continue
                step()
                trainer.save(asynchronous=False)
                paired.append(_checkpoint_records(log_dir)[-1]["gb_per_s"])
        over_dd = [w / d for w, d in zip(paired, dds)]
        # Tokens/s with a save every `block` steps, the three variants in interleaved blocks.
        tokens: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
        for order in h.abba(args.rounds, ["none", "sync", "async"]):
            for mode in order:
                started = time.perf_counter()
                step()
                if mode != "none":
                    trainer.save(asynchronous=mode == "async")
                step(args.block - 1)
                # a write still running at the block's end is this block's cost
                trainer.checkpoints.drain()
                tokens[mode].append(
                    args.block * trainer.tokens_per_step / (time.perf_counter() - started))
    finally:
        trainer.checkpoints.drain()
        session.close()
    sync_stall, async_stall = h.median(stalls["sync"]), h.median(stalls["async"])
    return {
        "zero_stage": stage, "checkpoint_gb": round(size / 1e9, 3),
        "stall_s": stalls,
        "stall_async_over_sync": round(async_stall / sync_stall, 4), "stall_goal": 0.15,
        "stall_async_over_deepspeed_default": round(async_stall / h.median(stalls["deepspeed"]), 4),
        "first_async_stall_s": first_async,
        # Synchronous saves measure the writer against the disk; asynchronous ones write while
        # training runs (on CPU they share the cores with it, at a lower priority).
        "write_gb_per_s": {"sync": writes["sync"], "async": writes["async"],
                           "sync_paired_with_dd": [round(w, 3) for w in paired],
                           "dd_oflag_direct": [round(d, 3) for d in dds]},
        # median over the rounds of (synchronous save / dd in the same round), and its range
        "write_over_dd": round(h.median(over_dd), 3), "write_goal": 0.8,
        "write_over_dd_range": [round(min(over_dd), 3), round(max(over_dd), 3)],
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in tokens.items()},
        "tokens_per_s_ratio": {k: round(h.median(tokens[k]) / h.median(tokens["none"]), 3)
                               for k in ("sync", "async")},
        "save_every_steps": args.block,
    }


def bench_stall(args) -> dict[str, Any]:
    import tempfile

    stages = [int(s) for s in args.stages.split(",")]
    head = {"mode": "stall", "preset": args.preset, "precision": args.precision,
            "seq_len": args.seq_len, "rounds": args.rounds}
    if len(stages) == 1:
        with tempfile.TemporaryDirectory(prefix="neox-save-bench-", dir=args.scratch) as tmp:
            return {**head, "stages": [_stall_for_stage(Path(tmp), args, stages[0])]}
    # One process per stage: an engine and its snapshot buffers are not freed inside a process, and
    # two 410M engines with their snapshots do not fit in 24 GiB.
    out = []
    for stage in stages:
        argv = [a for a in sys.argv[1:]]
        argv[argv.index("--stages") + 1] = str(stage)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"bench: ZeRO-{stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out += json.loads(proc.stdout.strip().splitlines()[-1])["stages"]
    return {**head, "stages": out}


def _agree_worker(rank: int, port: int, calls: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")
    import torch.distributed as dist

    from neox_train.distributed import Control

    dist.init_process_group("gloo", rank=rank, world_size=2)
    control = Control(2)
    for _ in range(50):
        control.sum([0, 0])
    started = time.perf_counter()
    for _ in range(calls):
        control.sum([0, 1])
    elapsed = time.perf_counter() - started
    if rank == 0:
        out.put(elapsed / calls)
    dist.destroy_process_group()


def bench_agree(args) -> dict[str, Any]:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, args.calls, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    per_call = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return {"mode": "agree", "ranks": 2, "calls": args.calls,
            "us_per_step": round(per_call * 1e6, 1)}


def bench_preempt(args) -> dict[str, Any]:
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    # the test kit's gcp-storage-emulator on a loopback port
    from gcs import Emulator, create_bucket

    results = []
    emulator = Emulator()
    bucket = create_bucket(emulator.url)
    with tempfile.TemporaryDirectory(prefix="neox-preempt-bench-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        data = h.synthetic_shards(scratch / "data", vocab_size=args.vocab_size, num_tokens=400_000)
        for sync in (False, True):
            run = dict(model=args.preset, seq_len=args.seq_len, vocab_size=args.vocab_size,
                       micro_batch=2, grad_accum=1, mixed_precision="no", ds_config="zero0",
                       max_steps=100_000, save_steps=100_000, log_steps=1, eval_steps=0,
                       data_dir=str(data), save_dir=str(scratch / f"ckpt{sync}"),
                       log_dir=str(scratch / f"logs{sync}"), val_fraction=0.01,
                       sync_to=f"gs://{bucket}/preempt" if sync else None)
            config = scratch / f"run{sync}.json"
            config.write_text(json.dumps(run))
            env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url,
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            proc = subprocess.Popen([str(Path(sys.executable).parent / "neox-train"), "--config",
                                     str(config)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            metrics = scratch / f"logs{sync}" / "metrics.jsonl"
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not (
                    metrics.is_file() and metrics.read_text().count('"train"') >= args.steps):
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=900)
            summary = json.loads(re.findall(r"done: (\{.*\})", err)[-1])["preemption"]
            results.append({"sync_to": "gcs emulator" if sync else None, **summary,
                            "exit_code": proc.returncode})
    emulator.stop()
    return {"mode": "preempt", "preset": args.preset, "seq_len": args.seq_len, "runs": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("stall", "agree", "preempt"))
    p.add_argument("--preset", default="neox-410m")
    p.add_argument("--stages", default="0,2")
    p.add_argument("--precision", choices=("no", "bf16"), default="no")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write-rounds", type=int, default=6,
                   help="stall mode: rounds of dd against a synchronous save (alternating order)")
    p.add_argument("--block", type=int, default=4,
                   help="stall mode: steps per tokens/s block (one save each)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3, help="preempt mode: steps before SIGTERM")
    p.add_argument("--scratch", default=None,
                   help="folder for checkpoints (default: the system temp folder)")
    args = p.parse_args()
    result = {"stall": bench_stall, "agree": bench_agree, "preempt": bench_preempt}[args.mode](args)
    h.emit({"bench": "save", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
