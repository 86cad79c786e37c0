"""GPU path (skipped without CUDA): bf16 training with torch's fused CUDA AdamW, ZeRO-0 and ZeRO-2, through the real entry point."""

import pytest

from conftest import read_metrics, run_train, test_ds_config, tiny_run_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [0, 2])
def test_gpu_bf16_trains(tmp_path, token_dir, stage):
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, stage)), mixed_precision="bf16", max_steps=8, save_steps=4)
    proc = run_train(["--config", str(run)])
    effective = proc.stderr.split("effective DeepSpeed config")[1].split("\n")[0]
    assert '"fused": true' in effective
    train = read_metrics(tmp_path / "logs")
    losses = [train[s]["loss"] for s in sorted(train)]
    assert losses[-1] < losses[0] - 0.05
