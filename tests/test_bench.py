"""The performance benchmarks run on CPU with the tiny preset: each prints exactly one JSON line on
stdout with the promised structure and sane values. Timings on a shared CPU say nothing here; ranges
are deliberately wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.slow  # each starts a process that imports DeepSpeed and trains a few steps

TINY = ["--preset", "neox-tiny", "--seq-len", "32", "--vocab-size", "256"]


def bench(script: str, *args: str, timeout: int = 300) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args],
                          capture_output=True, text=True, env=train_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout[:2000]}"
    result = json.loads(lines[0])
    assert result["date"] and script in result["command"] and result["device"] == "cpu"
    return result


def _fraction(x) -> bool:
    return 0.0 <= x <= 1.0


def test_throughput_one_configuration():
    r = bench("throughput.py", *TINY, "--steps", "6", "--log-steps", "2", "--peak-tflops", "1",
              "--set", "activation_checkpointing=true")
    assert r["bench"] == "throughput" and r["mode"] == "single" and r["steps"] == 6
    assert r["switches"] == {"activation_checkpointing": True}
    assert r["records"] == 3 and r["measured_records"] == 2 and r["measured_steps"] == 4
    # hand-computed in test_perf
    assert r["flops_per_token"] == 737_280 and r["hardware_flops_per_token"] == 950_272
    assert r["peak_tflops"] == 1.0
    assert 100 < r["tokens_per_s"] < 10_000_000
    # medians
    assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * 737_280 / 1e12, rel=0.2)
    assert 0 < r["mfu"] < 1 and r["hfu"] > r["mfu"]
    b = r["breakdown"]
    assert _fraction(b["data_wait_frac"]) and b["fwd_bwd_s"] > 0 and b["optimizer_s"] > 0
    assert b["data_wait_s"] + b["fwd_bwd_s"] + b["optimizer_s"] <= r["step_time_s"] * 1.05
    assert 0.05 < r["memory"]["host_rss_peak_gib"] < 64 and "gpu_mem_peak_gib" not in r["memory"]


def test_throughput_compare_interleaves_variants():
    r = bench("throughput.py", *TINY, "--micro-batch", "2", "--compare",
              "optimizer_impl=torch,torch_fused", "--block", "2", "--rounds", "2")
    assert r["mode"] == "compare" and r["switch"] == "optimizer_impl" and r["peak_tflops"] is None
    values = [v["value"] for v in r["variants"]]
    assert values == ["torch", "torch_fused"]
    first, second = r["variants"]
    assert first["ratio_to_first"] == 1.0 and first["per_round_ratio"] == [1.0, 1.0]
    assert 0.1 < second["ratio_to_first"] < 10 and len(second["per_round_ratio"]) == 2
    for v in r["variants"]:
        assert v["step_time_s_median"] > 0 and v["tokens_per_s"] > 0 and v["mfu"] is None
        assert _fraction(v["breakdown"]["data_wait_frac"])
    # Same data, same seed, same initial weights: the optimizer kernel changes no result beyond
    # rounding.
    assert first["loss_last"] == pytest.approx(second["loss_last"], rel=1e-4)


def test_overhead_bench():
    r = bench("overhead.py", *TINY, "--micro-batch", "2", "--grad-accum", "2", "--block", "2",
              "--rounds", "2", "--log-steps", "2")
    assert r["bench"] == "overhead" and r["goal"] == 1.03 and r["upload_worker"] is True
    assert len(r["ratios"]) == 2 and 0.2 < r["ratio_median"] < 5
    assert r["goal_met"] == (r["ratio_median"] <= 1.03)
    assert r["trainer_step_s_median"] > 0 and r["bare_step_s_median"] > 0
    assert _fraction(r["data_wait_frac_median"])
    assert r["trainer_breakdown_median"]["fwd_bwd_s"] > 0


def test_dataloader_bench():
    r = bench("dataloader.py", *TINY, "--micro-batch", "4", "--grad-accum", "1", "--batches", "50",
              "--loader-rounds", "1", "--block", "2", "--rounds", "2", "--tokens", "20000",
              "--shards", "3")
    # 3 x 6667 tokens -> 20000 // 32
    assert r["bench"] == "dataloader" and r["shards"] == 3 and r["windows"] == 625
    assert set(r["loader_samples_per_s"]) == {"prefetch_0", "prefetch_2"}
    assert all(v > 100 for v in r["loader_samples_per_s"].values())
    for name in ("prefetch_0", "prefetch_2"):
        m = r["model"][name]
        assert m["samples_per_s"] > 0 and _fraction(m["data_wait_frac"]) and m["step_time_s"] > 0
    consumed = r["model"]["prefetch_2"]["samples_per_s"]
    assert r["headroom"] == pytest.approx(r["loader_samples_per_s"]["prefetch_2"] / consumed)
    assert r["data_wait_frac"] == r["model"]["prefetch_2"]["data_wait_frac"]
    assert r["goal_met"] == (r["data_wait_frac"] < 0.01)


def test_save_bench_stall_and_agreement():
    r = bench("save_bench.py", "stall", *TINY, "--stages", "0,2", "--rounds", "1", "--block", "2")
    assert (r["bench"] == "save" and r["mode"] == "stall"
            and [s["zero_stage"] for s in r["stages"]] == [0, 2])
    for stage in r["stages"]:
        assert len(stage["stall_s"]["sync"]) == len(stage["stall_s"]["async"]) == 1
        assert stage["stall_async_over_sync"] > 0 and stage["write_over_dd"] > 0
        assert min(stage["write_gb_per_s"]["dd_oflag_direct"]) > 0 and stage["checkpoint_gb"] > 0
        assert set(stage["tokens_per_s"]) == {"none", "sync", "async"}
    r = bench("save_bench.py", "agree", "--calls", "200")
    assert r["mode"] == "agree" and r["ranks"] == 2 and 0 < r["us_per_step"] < 100_000


def test_heal_bench_alternates_guard_and_watchdog_on_and_off():
    r = bench("heal_bench.py", *TINY, "--block", "2", "--rounds", "2")
    assert r["bench"] == "heal" and r["goal"] == 1.01 and len(r["ratios"]) == 2
    assert 0.2 < r["ratio_median"] < 5 and r["on_step_s_median"] > 0 and r["off_step_s_median"] > 0
    # a healthy run: the guard judged every step and skipped none
    assert r["guard_skipped_updates"] == 0


def test_prepare_bench_against_datasets_map():
    r = bench("prepare_bench.py", "--mb", "2", "--rounds", "1", "--workers", "2")
    assert r["bench"] == "prepare" and r["same_tokens"] and r["tokens"] > 100_000
    assert r["prepare_tokens_per_s"] > 0 and r["datasets_map_tokens_per_s"] > 0 and r["ratio"] > 0
    assert 0 < r["prepare_peak_rss_gib"] < 8 and 0 < r["datasets_map_peak_rss_gib"] < 8


def test_data_startup_bench_on_a_small_dataset():
    r = bench("data_startup.py", "--tokens", "5000000", "--keep-page-cache", "--only", "indexed",
              timeout=600)
    assert r["bench"] == "data_startup" and r["tokens"] == 5_000_000 and "shards" not in r
    for kind in ("indexed",):
        for phase in ("cold", "warm"):
            assert 0 < r[kind][phase]["first_step_s"] < 120 and r[kind][phase]["peak_rss_gib"] > 0
        assert r[kind]["page_cache_dropped"] is False


def test_transfer_bench_compares_ours_one_stream_and_transfer_manager():
    r = bench("transfer_bench.py", "--mb", "33", "--streams", "1,2", "--rounds", "1",
              "--cap-mb-s", "100")
    assert r["bench"] == "transfer_bench" and r["streams"] == [1, 2]
    assert r["server_ceiling"]["up_mb_s"] > 0 and r["server_ceiling"]["down_mb_s"] > 0
    assert set(r["big_file"]) == {"up x1", "down x1", "up x2", "down x2"}
    for row in r["big_file"].values():
        assert row["ours_mb_s"] > 0 and row["one_stream_mb_s"] > 0
        assert row["transfer_manager_mb_s"] > 0 and row["ours_cpu_s_per_gb"] > 0
        assert row["ours_added_rss_mb"] >= 0
        assert 0 < row["ours_over_one_stream"]["min"] <= row["ours_over_one_stream"]["max"]


def test_tracker_bench_alternates_trackers_on_and_off():
    r = bench("tracker_bench.py", *TINY, "--block", "2", "--rounds", "2")
    assert r["bench"] == "trackers" and len(r["ratios"]) == 2 and r["log_steps"] == 1
    assert 0.2 < r["ratio_median"] < 5 and r["on_step_s_median"] > 0
    # every logged step of the "on" blocks (and the readiness point) reached both trackers
    for name in ("wandb", "mlflow"):
        assert r["trackers"][name]["dropped"] == 0 and r["trackers"][name]["sent"] >= 7


def test_loss_memory_bench_compares_whole_and_chunked_in_processes_of_their_own():
    r = bench("loss_memory.py", "--micro-batch", "2", "--seq-len", "256", "--vocab", "8192",
              "--hidden", "64", "--chunk", "64")
    assert r["bench"] == "loss_memory" and r["goal"] == 0.3 and r["chunk"] == 64
    assert r["whole_extra_gib"] > 0 and r["chunked_extra_gib"] > 0 and r["ratio"] < 1
    assert r["loss_chunked"] == pytest.approx(r["loss_whole"], rel=1e-5)
    assert r["grad_weight_norm_chunked"] == pytest.approx(r["grad_weight_norm_whole"], rel=1e-5)


@pytest.mark.slow
def test_gpu_check_dry_run_walks_every_step_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=train_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["micro_batch"] == 2
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["gpu_tests", "eager", "compiled", "document_masking", "save_stall"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    for name in ("eager", "compiled", "document_masking"):
        assert steps[name]["result"]["tokens_per_s"] > 0
    assert "skipped" in steps["gpu_tests"]["summary"]  # no CUDA here: the gpu tests skip
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| ok |") == 5 and "CPU (dry run)" in table
