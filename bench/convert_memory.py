"""Wall time and peak memory of `neox-convert-hf` on a ~400M-parameter checkpoint, printed as one
JSON line.

    .venv/bin/python bench/convert_memory.py [--stage 2] [--dtypes bf16,fp32]
        [--verify-dtypes bf16,fp16,fp32] [--workdir DIR] [--keep]

1. Builds the checkpoint with a real DeepSpeed engine (one CPU rank, gloo): the Pythia-410M shape
   (hidden 1024, 24 layers, 16 heads, vocabulary 50304: 405,334,016 parameters), bf16 training at
   the given ZeRO stage, one optimizer step (so the optimizer files hold real Adam moments: ~5.6 GB
   at ZeRO-1/2), saved through the trainer's own save path (checkpoint.local.saver; config.json and
   run.json included).
2. Converts it with the real console script in a child process per dtype and reports the child's
   wall time and peak RSS (its own, from wait4: VmHWM, which counts memory-mapped file pages read as
   well as anonymous memory) and the peak of anonymous memory alone (RssAnon, sampled every 10 ms),
   next to the size of the weights written; and the same for a 2-layer checkpoint of the same stage:
   the baseline of the process itself.
3. `--verify` conversions (one per verify dtype) give the max abs logit difference per dtype at this
   size.

Needs ~10 GB of RAM to build the checkpoint and ~8 GB of disk in --workdir (default: a temporary
folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent

# The Pythia-410M shape: ~400M parameters, the size the issue asks to measure.
SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             max_position_embeddings=2048, vocab_size=50304)
# The same code path on a 2-layer model: what the process itself costs (Python, torch, transformers,
# DeepSpeed).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=256, vocab_size=256)


def build_checkpoint(save_dir: Path, stage: int, shape: dict) -> None:
    """One bf16 optimizer step of the 400M model at `stage`, saved the way neox-train saves."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_train.checkpoint.local import train_state
    from neox_train.checkpoint.local.checkpoint_engine import install
    from neox_train.checkpoint.local.saver import Saver
    from neox_train.distributed import Control, init_distributed
    from neox_train.model import param_groups

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    import deepspeed

    cfg = GPTNeoXConfig(
        **shape,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25},
        use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
    }
    torch.manual_seed(0)
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers holds a weakref: partition as built
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841
        model = GPTNeoXForCausalLM._from_config(cfg)
    else:
        model = GPTNeoXForCausalLM(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                      config=ds_config)
    ids = torch.randint(0, shape["vocab_size"], (1, 17))
    loss = engine(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
    engine.backward(loss)
    engine.step()
    state = train_state.TrainState(step=1, consumed_samples=1)
    run_config = {"model": "bench", "seq_len": 16, "vocab_size": shape["vocab_size"],
                  "save_dir": str(save_dir), "data_dir": "", "log_dir": ""}
    extra = train_state.client_state(state=state, run_config=run_config, ds_config=ds_config,
                                     model_config=cfg.to_dict(), dp_size=1, data_tokens=0)
    saver = Saver(engine, install(engine, pin_memory=False), save_dir, owner=True, run_id=None,
                  control=Control(1), asynchronous=False)
    saver.begin(state.step, extra, losses={}, expected_bytes=None)
    saver.finish()


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str]) -> dict:
    """Run cmd; its wall time, its own peak RSS (wait4) and its sampled peak anonymous RSS, in
    MB."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kb(proc.pid, "RssAnon"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
               for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{''.join(err_chunks)[-4000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_anon_mb": round(peak_anon[0] / 1024, 1), "stdout": "".join(out_chunks)}


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--dtypes", default="bf16,fp32",
                    help="conversions measured for time and memory")
    ap.add_argument("--verify-dtypes", default="bf16,fp16,fp32",
                    help="conversions run with --verify ('' for none)")
    ap.add_argument("--workdir",
                    help="where the checkpoint and exports go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    # the child that builds
    ap.add_argument("--build-only", metavar="SAVE_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build_checkpoint(Path(args.build_only), args.stage, TINY if args.tiny else SHAPE)
        return 0

    work = Path(args.workdir) if args.workdir else Path(
        tempfile.mkdtemp(prefix="neox-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    save_dir = work / f"ckpt-zero{args.stage}"
    tiny_dir = work / f"ckpt-zero{args.stage}-tiny"
    try:
        for folder, tiny in ((save_dir, False), (tiny_dir, True)):
            if not (folder / "latest").is_file():
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--stage", str(args.stage),
                                "--build-only", str(folder)]
                               + (["--tiny"] if tiny else []),
                               check=True, env=dict(os.environ, RANK="0", LOCAL_RANK="0",
                                                    WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                                    MASTER_PORT="29533"))
                print(f"built {folder.name} in {time.perf_counter() - started:.0f} s",
                      file=sys.stderr)
        tag = (save_dir / "latest").read_text().strip()
        exe = str(BIN / "neox-convert-hf")
        baseline = measure([exe, str(tiny_dir), "--out", str(work / "hf-tiny"), "--dtype", "bf16",
                            "--overwrite"])
        result = {"stage": args.stage, "training_precision": "bf16",
                  "checkpoint_mb": folder_mb(save_dir / tag), "cpu_count": os.cpu_count(),
                  "baseline_peak_rss_mb": baseline["peak_rss_mb"],
                  "baseline_peak_anon_mb": baseline["peak_anon_mb"], "conversions": [],
                  "verify": []}
        for dtype in filter(None, args.dtypes.split(",")):
            out = work / f"hf-{dtype}"
            m = measure([exe, str(save_dir), "--out", str(out), "--dtype", dtype, "--overwrite",
                         "--json"])
            summary = json.loads(m.pop("stdout"))
            result["parameters"] = summary["parameters"]
            weights_mb = round(summary["total_size"] / 2**20, 1)
            above = m["peak_rss_mb"] - baseline["peak_rss_mb"]
            result["conversions"].append({
                "dtype": dtype, **m, "weights_mb": weights_mb,
                "peak_rss_over_weights": round(m["peak_rss_mb"] / weights_mb, 2),
                "peak_rss_above_baseline_over_weights": round(above / weights_mb, 2)})
            print(json.dumps(result["conversions"][-1]), file=sys.stderr)
        for dtype in filter(None, args.verify_dtypes.split(",")):
            out = work / f"hf-verify-{dtype}"
            m = measure([exe, str(save_dir), "--out", str(out), "--dtype", dtype, "--overwrite",
                         "--verify", "--json"])
            verify = json.loads(m.pop("stdout"))["verify"]
            result["verify"].append({"dtype": dtype, "max_abs_diff": verify["max_abs_diff"],
                                     "tolerance": verify["tolerance"],
                                     "argmax_agreement": verify["argmax_agreement"],
                                     "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]})
            print(json.dumps(result["verify"][-1]), file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(result))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
