"""End-to-end training through the real entry point: every ZeRO stage at 1 and 2 processes (the
second through the real `deepspeed` launcher on gloo), loss falling, checkpoints written, and exact
resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import (
    TRAINED_CASES,
    TRAINED_SAVE_AT,
    TRAINED_STEPS,
    copy_checkpoint,
    read_metrics,
    run_train,
    test_ds_config,
    tiny_run_config,
)

# each case starts real processes (~5-15 s on 2 cores); kept in the default run
pytestmark = pytest.mark.slow

MAX_STEPS = TRAINED_STEPS
SAVE_AT = TRAINED_SAVE_AT

# (stage, processes, precision): the session's shared runs (conftest.trained_run; test_convert
# exports the same ones). fp32 where exactness is checked bit-for-bit, bf16 (the product default)
# elsewhere.
CASES = TRAINED_CASES


def straight_run(trained_run, stage: int, nprocs: int, precision: str) -> tuple[Path, Path]:
    """The shared run of MAX_STEPS steps, saved at SAVE_AT and at the end: (run folder, its
    run.json)."""
    tmp = trained_run(stage, nprocs, precision)
    return tmp, tmp / "run.json"


@pytest.mark.parametrize("stage,nprocs,precision", CASES,
                         ids=[f"zero{s}-{n}proc-{p}" for s, n, p in CASES])
def test_stage_trains_and_checkpoints(trained_run, stage, nprocs, precision):
    tmp, _ = straight_run(trained_run, stage, nprocs, precision)
    train = read_metrics(tmp / "logs")
    assert sorted(train) == list(range(1, MAX_STEPS + 1))
    losses = [train[s]["loss"] for s in sorted(train)]
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall: {losses}"
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train.values())
    # Global batch: 4 sequences x 2 micro-steps x nprocs per step.
    assert train[MAX_STEPS]["consumed_samples"] == MAX_STEPS * 4 * 2 * nprocs
    evals = read_metrics(tmp / "logs", "eval")
    assert (sorted(evals) == [SAVE_AT, MAX_STEPS]
            and evals[MAX_STEPS]["loss"] < evals[SAVE_AT]["loss"] + 0.5)

    ckpt = tmp / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"global_step{MAX_STEPS}"
    for step in (SAVE_AT, MAX_STEPS):
        tag = ckpt / f"global_step{step}"
        model_states = sorted(p.name for p in tag.glob("*model_states.pt"))
        # ZeRO-3 partitions the parameters too: one model-states file per rank.
        assert model_states == (
            [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(nprocs)] if stage == 3
            else ["mp_rank_00_model_states.pt"]
        )
        model_cfg = json.loads((tag / "config.json").read_text())
        assert model_cfg["model_type"] == "gpt_neox" and model_cfg["hidden_size"] == 64
        meta = json.loads((tag / "run.json").read_text())
        assert meta["step"] == step and meta["dp_size"] == nprocs
        assert meta["ds_config"]["zero_optimization"]["stage"] == stage
    if stage > 0:
        shards = sorted(p.name for p in (ckpt / f"global_step{MAX_STEPS}").glob("*optim_states.pt"))
        assert len(shards) == nprocs, shards
    # Weights start from HF's init (std 0.02) at every stage: ZeRO-3 builds the model partitioned,
    # which must not skip the init (a bare zero.Init left std 1.0 embeddings).
    embed = consolidated_weights(
        ckpt, f"global_step{SAVE_AT}", stage)["gpt_neox.embed_in.weight"].float()
    assert 0.015 < embed.std().item() < 0.03
    # TensorBoard events are real files that TensorBoard itself reads back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp / "logs" / "tensorboard"))
    events.Reload()
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                 "train/step_time_s"):
        assert [e.step for e in events.Scalars(name)] == list(range(1, MAX_STEPS + 1)), name
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [SAVE_AT, MAX_STEPS]
    effective = json.loads((ckpt / "ds_config.json").read_text())
    assert effective["train_batch_size"] == 8 * nprocs
    assert (tmp / "logs" / "training.log").read_text().count("saved checkpoint") == 2


def consolidated_weights(save_dir: Path, tag: str, stage: int) -> dict:
    import torch

    if stage == 0:  # zero_to_fp32 does not handle ZeRO-0 (DEEPSPEED_NOTES)
        return torch.load(save_dir / tag / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag)


# CPU kernels and gloo reductions are deterministic: a resumed run reproduces the losses to the last
# bit.
RESUME_CASES = [(0, 1, "no", 1e-6), (0, 2, "bf16", 1e-6), (2, 1, "no", 1e-6), (2, 2, "bf16", 1e-6)]


@pytest.mark.parametrize(
    "stage,nprocs,precision,tol", RESUME_CASES,
    ids=[f"zero{s}-{n}proc-{p}" for s, n, p, _ in RESUME_CASES]
)
def test_resume_is_exact(trained_run, tmp_path, stage, nprocs, precision, tol):
    """N steps straight == k steps, then a new process resuming from the step-k checkpoint for N-k
    steps."""
    tmp, run = straight_run(trained_run, stage, nprocs, precision)
    straight = read_metrics(tmp / "logs")
    resumed_dir = tmp_path / "resumed"
    copy_checkpoint(tmp / "ckpt", resumed_dir, f"global_step{SAVE_AT}")
    proc = run_train(
        ["--config", str(run), "--save-dir", str(resumed_dir), "--log-dir", str(tmp_path / "logs"),
         "--resume", "latest"],
        nprocs=nprocs,
    )
    assert f"resumed from {resumed_dir / f'global_step{SAVE_AT}'}: step {SAVE_AT}" in proc.stderr
    resumed = read_metrics(tmp_path / "logs")
    assert sorted(resumed) == list(range(SAVE_AT + 1, MAX_STEPS + 1))
    for step in resumed:
        assert resumed[step]["consumed_samples"] == straight[step]["consumed_samples"]
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9)
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=tol), step
    eval_straight = read_metrics(tmp / "logs", "eval")[MAX_STEPS]["loss"]
    assert (read_metrics(tmp_path / "logs", "eval")[MAX_STEPS]["loss"]
            == pytest.approx(eval_straight, abs=tol))


def test_zero3_eval_with_tiny_validation_split_does_not_hang(tmp_path, token_dir):
    """3 validation windows for 2 ranks x micro-batch 4: rank 1 has nothing to evaluate but must
    still take part in ZeRO-3's collective parameter gathers."""
    run = tiny_run_config(
        # Threshold 0: every parameter is partitioned (the tiny model's would otherwise all stay
        # whole).
        tmp_path, token_dir,
        ds_config=str(test_ds_config(tmp_path, 3, stage3_param_persistence_threshold=0)),
        mixed_precision="bf16", max_steps=2, save_steps=2, eval_steps=1, val_fraction=0.002,
    )
    run_train(["--config", str(run)], nprocs=2, timeout=180)
    evals = read_metrics(tmp_path / "logs", "eval")
    assert sorted(evals) == [1, 2] and all(e["sequences"] == 3 for e in evals.values())


# neox-tiny at seq 32 with vocab 256 (hand-computed in test_perf): model and hardware (recompute)
# FLOPs per token.
TINY_FLOPS, TINY_FLOPS_RECOMPUTE = 737_280, 950_272


@pytest.mark.parametrize("nprocs,precision", [(1, "no"), (2, "bf16")])
def test_performance_accounting_reaches_metrics_tensorboard_and_log(trained_run, nprocs, precision):
    tmp, _ = straight_run(trained_run, 0, nprocs, precision)
    train = read_metrics(tmp / "logs")
    for step, r in train.items():
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / nprocs)
        assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * TINY_FLOPS / 1e12)
        assert r["hfu_tflops_per_gpu"] == r["tflops_per_gpu"]  # no recompute
        assert r["mfu"] is None and r["hfu"] is None  # CPU and no --peak-tflops: no honest peak
        # On CPU every phase is host time inside the step, so the parts add up to the step.
        parts = r["data_wait_s"] + r["fwd_bwd_s"] + r["optimizer_s"] + r["other_s"]
        assert parts == pytest.approx(r["step_time_s"]) and r["other_s"] > -1e-6
        assert r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0 and 0 <= r["data_wait_frac"] < 0.5
        # A process that imported torch and DeepSpeed holds a few hundred MiB; a tiny model adds
        # little.
        assert 0.2 < r["host_rss_peak_gib"] < 4
    peaks = [train[s]["host_rss_peak_gib"] for s in sorted(train)]
    assert peaks == sorted(peaks), "a high-water mark never falls (the current RSS would)"
    # The save at SAVE_AT stalls the loop after that step's record: the next record reports the
    # snapshot, a later one the asynchronous commit; together they are the save's
    # checkpoint/stall_s, counted once.
    assert (train[SAVE_AT]["checkpoint_stall_s"] == 0
            and train[SAVE_AT + 1]["checkpoint_stall_s"] > 0)
    reported = sum(train[s]["checkpoint_stall_s"] for s in range(SAVE_AT + 1, MAX_STEPS))
    assert reported == pytest.approx(read_metrics(tmp / "logs", "checkpoint")[SAVE_AT]["stall_s"],
                                     abs=0.05)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp / "logs" / "tensorboard"))
    events.Reload()
    for name in ("train/tflops_per_gpu", "train/tokens_per_s_per_gpu", "train/data_wait_s",
                 "train/fwd_bwd_s", "train/optimizer_s", "train/data_wait_frac",
                 "train/host_rss_peak_gib"):
        assert [e.step for e in events.Scalars(name)] == list(range(1, MAX_STEPS + 1)), name
    assert "train/mfu" not in events.Tags()["scalars"]  # null is not a number to plot
    log_text = (tmp / "logs" / "training.log").read_text()
    assert ("MFU not reported: CPU" in log_text and "TFLOP/s/GPU" in log_text
            and "fwd+bwd" in log_text)


def test_prefetch_off_gives_identical_training_and_peak_gives_mfu(trained_run, tmp_path):
    """The prefetching loader (default) and assembly in the loop feed the same batches:
    bit-identical losses.
    --peak-tflops turns MFU on, on CPU too."""
    tmp, run = straight_run(trained_run, 0, 1, "no")
    run_train(["--config", str(run), "--save-dir", str(tmp_path / "ckpt"), "--log-dir",
               str(tmp_path / "logs"), "--prefetch", "0", "--peak-tflops", "0.5"])
    straight, got = read_metrics(tmp / "logs"), read_metrics(tmp_path / "logs")
    assert [got[s]["loss"] for s in sorted(got)] == [straight[s]["loss"] for s in sorted(straight)]
    assert [got[s]["consumed_samples"] for s in sorted(got)] == [straight[s]["consumed_samples"]
                                                                 for s in sorted(straight)]
    for r in got.values():
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5) and r["hfu"] == r["mfu"]
    assert "MFU against --peak-tflops 0.5" in (tmp_path / "logs" / "training.log").read_text()


def test_fast_path_switches_train_on_cpu(trained_run, tmp_path):
    """torch.compile through engine.compile() (backend aot_eager: TorchDynamo + AOTAutograd without
    C++ codegen, so it runs in seconds), activation checkpointing and torch's unfused AdamW (the
    default is fused), together: same losses as the plain run up to rounding, checkpoints still
    plain parameter names, HFU counting the recompute."""
    tmp, run = straight_run(trained_run, 0, 1, "no")
    proc = run_train(["--config", str(run), "--save-dir", str(tmp_path / "ckpt"), "--log-dir",
                      str(tmp_path / "logs"), "--compile", "aot_eager",
                      "--activation-checkpointing", "--optimizer-impl", "torch", "--peak-tflops",
                      "1"])
    assert "model compiled with torch.compile backend 'aot_eager'" in proc.stderr
    effective = json.loads(
        (tmp_path / "ckpt" / "ds_config.json").read_text())["optimizer"]["params"]
    assert effective["torch_adam"] is True and "fused" not in effective
    straight, got = read_metrics(tmp / "logs"), read_metrics(tmp_path / "logs")
    for step in straight:
        assert got[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step
        assert (got[step]["hfu"] / got[step]["mfu"]
                == pytest.approx(TINY_FLOPS_RECOMPUTE / TINY_FLOPS))
    weights = consolidated_weights(tmp_path / "ckpt", f"global_step{MAX_STEPS}", 0)
    assert "gpt_neox.embed_in.weight" in weights and not any("_orig_mod" in k for k in weights)


def test_unknown_compile_backend_is_refused_before_training(tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir)
    proc = run_train(["--config", str(run), "--compile", "inductr"], check=False, timeout=120)
    assert proc.returncode == 2
    assert ("compile='inductr' is not a torch.compile backend (valid:" in proc.stderr
            and "inductor" in proc.stderr)
    assert not (tmp_path / "ckpt").exists()


def test_the_summary_rate_is_the_whole_runs_and_the_window_says_window(tmp_path, token_dir):
    """Issue 23 item 5: the `done:` summary's tokens_per_s was the last logging window's rate, which
    leaves out evaluations and saves (1.48x the run's average on a run whose load changed). Now it
    is every step over the loop's wall time, and the window's rate is tokens_per_s_window. Long
    evaluations between the windows make the two differ."""
    run = tiny_run_config(tmp_path, token_dir, max_steps=6, log_steps=2, eval_steps=2,
                          eval_batches=40, save_steps=100, val_fraction=0.3)
    proc = run_train(["--config", str(run)])
    done = next(line for line in proc.stderr.splitlines() if " done: {" in line)
    summary = json.loads(done.split(" done: ", 1)[1])
    windows = [r["tokens_per_s"] for r in read_metrics(tmp_path / "logs").values()]
    assert summary["tokens_per_s_window"] == pytest.approx(windows[-1])
    # the evaluations (40 batches every 2 steps) count in the run's rate, not in a window's
    assert 0 < summary["tokens_per_s"] < 0.8 * min(windows)


def test_profile_steps_write_a_chrome_trace_and_tensorboard_files_per_rank(tmp_path, token_dir):
    """Issue 23 item 2: --profile-steps A-B records those steps on every rank (2 gloo ranks here)
    as a Chrome trace and as the TensorBoard profiler plugin's files; --memory-snapshot on a machine
    without CUDA is one WARNING, and the run goes on."""
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=5, save_steps=100, eval_steps=0)
    proc = run_train(["--config", str(run), "--profile-steps", "2-3", "--memory-snapshot", "2"],
                     nprocs=2)
    assert "--memory-snapshot records the CUDA caching allocator's history" in proc.stderr
    profile = tmp_path / "logs" / "profile"
    for rank in (0, 1):
        trace = json.loads((profile / f"trace-rank{rank}-steps2-3.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        # both profiled steps, and the model's own work inside them
        assert {"ProfilerStep#0", "ProfilerStep#1"} <= names, sorted(names)[:20]
        assert any(n.startswith("aten::") for n in names)
        tensorboard = list((profile / "tensorboard").glob(f"rank{rank}.*.pt.trace.json"))
        assert len(tensorboard) == 1 and json.loads(tensorboard[0].read_text())["traceEvents"]
    assert not list(profile.glob("memory-*"))


def test_wsd_schedule_resumes_exactly_and_a_branch_decays_from_the_stable_phase(tmp_path,
                                                                                 token_dir):
    """Issue 23 item 4: lr_schedule wsd holds the peak, then decays linearly over the last
    decay_steps to the floor (0.1 of the peak in the shipped JSONs); a resume is exact; resuming a
    stable-phase checkpoint with --max-steps S+N --decay-steps N decays a branch from step S."""
    run = tiny_run_config(tmp_path, token_dir, max_steps=8, save_steps=4, eval_steps=0,
                          lr_schedule="wsd", decay_steps=2)
    run_train(["--config", str(run)])
    straight = read_metrics(tmp_path / "logs")
    peak = straight[1]["lr"]
    assert [straight[s]["lr"] / peak for s in range(1, 9)] == pytest.approx(
        [1, 1, 1, 1, 1, 1, 0.55, 0.1])

    resumed = tmp_path / "resumed"
    copy_checkpoint(tmp_path / "ckpt", resumed, "global_step4")
    run_train(["--config", str(run), "--save-dir", str(resumed), "--log-dir",
               str(tmp_path / "logs-resumed"), "--resume", "latest"])
    again = read_metrics(tmp_path / "logs-resumed")
    assert sorted(again) == [5, 6, 7, 8]
    for s in again:
        assert again[s]["lr"] == straight[s]["lr"]
        assert again[s]["loss"] == pytest.approx(straight[s]["loss"], abs=1e-6)

    branch = tmp_path / "branch"
    copy_checkpoint(tmp_path / "ckpt", branch, "global_step4")
    run_train(["--config", str(run), "--save-dir", str(branch), "--log-dir",
               str(tmp_path / "logs-branch"), "--resume", "latest", "--max-steps", "6",
               "--decay-steps", "2"])
    decayed = read_metrics(tmp_path / "logs-branch")
    assert [decayed[s]["lr"] / peak for s in (5, 6)] == pytest.approx([0.55, 0.1])
