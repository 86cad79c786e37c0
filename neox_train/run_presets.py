"""The named run configs `--config NAME` accepts: the seed system's names, kept so users' habits
carry over. Plain data: config.py validates them like any config file."""

from __future__ import annotations

from typing import Any

# The seed system's config names, kept so users' habits carry over.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    # Quick validation of the real pipeline on a GPU: small model, few shards, frequent saves.
    "test": dict(
        name="test", model="neox-160m", seq_len=512, ds_config="zero2", micro_batch=2, grad_accum=2,
        mixed_precision="bf16", max_steps=1000, save_steps=200, log_steps=25, eval_steps=200,
        max_shards=5,
    ),
    # The flagship run: neox-1.2b, effective batch 16 sequences per GPU (4 x 4).
    "production": dict(
        name="production", model="neox-1.2b", seq_len=2048, ds_config="zero2", micro_batch=4,
        grad_accum=4, mixed_precision="bf16", max_steps=10000, save_steps=500, log_steps=100,
        eval_steps=500,
    ),
    # The README demo: trains on 2 CPU cores in a few minutes on the Python docs corpus.
    "demo": dict(
        name="demo", model="neox-demo", seq_len=128, ds_config="zero0", micro_batch=8, grad_accum=2,
        mixed_precision="no", max_steps=300, warmup_steps=30, save_steps=100, log_steps=10,
        eval_steps=50, eval_batches=8, keep_last_n=2, val_fraction=0.05, data_dir="data/demo",
        save_dir="checkpoints/demo", log_dir="logs/demo", sync_to="bucket/demo",
    ),
}
