"""GPU path (skipped without CUDA), through the real entry point: bf16 training at every ZeRO stage
with torch's fused CUDA AdamW, the accounting a GPU run must report (CUDA events, memory high-water
mark, MFU), torch.compile with the mask-free attention, exact-enough resume, and two ranks on two
GPUs where the machine has them.

Run with `pytest -m gpu` on a machine with CUDA; CI never needs one."""

from __future__ import annotations

import pytest

from conftest import copy_checkpoint, read_metrics, run_train, test_ds_config, tiny_run_config

pytestmark = pytest.mark.gpu

STEPS = 8
SAVE_AT = 4


def _gpu_run(tmp_path, token_dir, stage: int, **overrides):
    # peak_tflops: the test must not depend on which GPU it runs on for MFU to be reported.
    values = dict(ds_config=str(test_ds_config(tmp_path, stage)), mixed_precision="bf16",
                  max_steps=STEPS, save_steps=SAVE_AT, eval_steps=SAVE_AT, peak_tflops=989.0)
    values.update(overrides)
    return tiny_run_config(tmp_path, token_dir, **values)


def _check_gpu_records(train: dict[int, dict]) -> None:
    losses = [train[s]["loss"] for s in sorted(train)]
    assert losses[-1] < losses[0] - 0.05, losses
    for record in train.values():
        # Present only when the engine ran on CUDA: a silent CPU fallback fails here, not just on
        # speed.
        assert (record["gpu_mem_peak_gib"] > 0
                and record["gpu_mem_reserved_peak_gib"] >= record["gpu_mem_peak_gib"])
        assert record["mfu"] is not None and 0 < record["mfu"] < 1
        # CUDA-event phases: positive, and within the wall-clock step they are part of.
        assert record["fwd_bwd_s"] > 0 and record["optimizer_s"] > 0
        assert record["fwd_bwd_s"] + record["optimizer_s"] <= record["step_time_s"] * 1.05


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gpu_bf16_trains_and_reports(tmp_path, token_dir, stage):
    proc = run_train(["--config", str(_gpu_run(tmp_path, token_dir, stage))])
    effective = proc.stderr.split("effective DeepSpeed config")[1].split("\n")[0]
    assert '"fused": true' in effective and '"torch_adam": true' in effective
    _check_gpu_records(read_metrics(tmp_path / "logs"))


def test_gpu_compiled_training_matches_eager_start(tmp_path, token_dir):
    """torch.compile (inductor) with the training attention: trains, and its first loss equals the
    eager run's within bf16 noise (same init, same batch)."""
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    eager_dir.mkdir()
    compiled_dir.mkdir()
    run_train(["--config", str(_gpu_run(eager_dir, token_dir, 1))])
    run_train(["--config", str(_gpu_run(compiled_dir, token_dir, 1, compile="inductor"))],
              timeout=900)
    eager, compiled = read_metrics(eager_dir / "logs"), read_metrics(compiled_dir / "logs")
    _check_gpu_records(compiled)
    assert compiled[1]["loss"] == pytest.approx(eager[1]["loss"], abs=2e-2)


def test_gpu_resume_continues_the_run(tmp_path, token_dir):
    """GPU kernels are not bit-deterministic (atomics in the backward), so the resumed losses are
    compared with a tolerance; positions and the schedule must match exactly."""
    straight = tmp_path / "straight"
    straight.mkdir()
    run = _gpu_run(straight, token_dir, 2)
    run_train(["--config", str(run)])
    resumed_dir = tmp_path / "resumed"
    copy_checkpoint(straight / "ckpt", resumed_dir, f"global_step{SAVE_AT}")
    run_train(["--config", str(run), "--save-dir", str(resumed_dir), "--log-dir",
               str(tmp_path / "logs2"), "--resume", "latest"])
    a, b = read_metrics(straight / "logs"), read_metrics(tmp_path / "logs2")
    assert sorted(b) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in b:
        assert b[step]["consumed_samples"] == a[step]["consumed_samples"]
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=2e-2)


def test_two_gpus_train(tmp_path, token_dir):
    """Two ranks on two GPUs through the deepspeed launcher (NCCL): every rank must own its device
    before the first collective."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    run = _gpu_run(tmp_path, token_dir, 2)
    run_train(["--config", str(run)], nprocs=2)
    train = read_metrics(tmp_path / "logs")
    _check_gpu_records(train)
    assert train[STEPS]["consumed_samples"] == STEPS * 4 * 2 * 2


def test_gpu_profile_and_memory_snapshot(tmp_path, token_dir):
    """Issue 23 item 2 on CUDA: the profile of steps 2-3 holds CUDA kernels, and the memory
    snapshot at step 2 is the allocator's history (what pytorch.org/memory_viz reads)."""
    import json
    import pickle

    run = _gpu_run(tmp_path, token_dir, 0, max_steps=4, save_steps=100, eval_steps=0)
    run_train(["--config", str(run), "--profile-steps", "2-3", "--memory-snapshot", "2"])
    profile = tmp_path / "logs" / "profile"
    snapshot = pickle.loads((profile / "memory-rank0-step2.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"][0]
    trace = json.loads((profile / "trace-rank0-steps2-3.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])


def test_gpu_flex_attention_masks_documents_without_a_dense_mask():
    """attention=flex_attention with document masking: a BlockMask, and the packed window equals
    its documents run alone, forward and backward (fp32 on CUDA)."""
    import torch
    from test_documents import EOS, TOL, _documents, _model

    from neox_train.lm_loss import document_inputs, window_loss

    model = _model("flex_attention").cuda()
    docs = [d.cuda() for d in _documents([5, 10, 9])]
    window = torch.cat(docs)[:16][None]
    inputs = document_inputs(window, EOS, block=True)
    assert type(inputs["attention_mask"]).__name__ == "BlockMask"
    packed = model(**{k: v for k, v in inputs.items() if k != "targets"}).logits[0]
    alone = torch.cat([model(input_ids=docs[0][None]).logits[0],
                       model(input_ids=docs[1][None]).logits[0]])
    torch.testing.assert_close(packed[:15], alone, **TOL)
    loss = window_loss(model, window, chunk=4, eos=EOS, block=True)
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
