"""DeepSpeed JSON: every shipped file loads and survives the overrides; batch arithmetic; bad
input."""

import json
from pathlib import Path

import pytest

from neox_train.config import RUN_PRESETS, RunConfig, load_run_config
from neox_train.ds_config import (
    DS_CONFIG_DIR,
    check_batch,
    effective_ds_config,
    load_ds_config,
    zero_stage,
)
from neox_train.errors import ConfigError

SHIPPED = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def test_expected_files_are_shipped():
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_ds_config(name):
    path, cfg = load_ds_config(name)
    assert path.name == f"{name}.json"
    assert cfg["bf16"]["enabled"] is True
    assert cfg["gradient_clipping"] > 0
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    expected_stage = int(name[4])
    assert zero_stage(cfg) == expected_stage
    assert ("offload_optimizer" in cfg["zero_optimization"]) == name.endswith("offload")
    # DeepSpeed's own parser accepts it (catches unknown zero_optimization keys, bad types).
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**cfg["zero_optimization"])
    for preset in RUN_PRESETS:
        run = load_run_config(preset).replace(ds_config=name)
        eff, _ = effective_ds_config(cfg, run, dp_size=8, on_gpu=True)
        assert (eff["train_batch_size"]
                == eff["train_micro_batch_size_per_gpu"] * eff["gradient_accumulation_steps"] * 8)
        assert eff["scheduler"]["params"]["total_num_steps"] == run.max_steps


@pytest.mark.parametrize(
    "dp,tb,mb,ga,expected",
    [
        (64, None, 4, 4, (1024, 4, 4)),
        (64, 1024, 4, None, (1024, 4, 4)),
        (64, 1024, None, 2, (1024, 8, 2)),
        (1, 16, None, None, (16, 16, 1)),
        (8, 128, 4, 4, (128, 4, 4)),
    ],
)
def test_check_batch(dp, tb, mb, ga, expected):
    assert check_batch(dp_size=dp, train_batch=tb, micro_batch=mb, grad_accum=ga) == expected


@pytest.mark.parametrize(
    "dp,tb,mb,ga,needle",
    [
        (64, 1000, 4, 4,
         "train_batch_size=1000 but micro_batch 4 x grad_accum 4 x data-parallel size 64 = 1024"),
        (3, 32, 4, None, "not a multiple of micro_batch 4 x data-parallel size 3 = 12"),
        (3, 32, None, 4, "not a multiple of grad_accum 4"),
        (2, None, 4, None, "batch under-specified"),
    ],
)
def test_check_batch_errors_name_the_numbers(dp, tb, mb, ga, needle):
    with pytest.raises(ConfigError, match="batch") as e:
        check_batch(dp_size=dp, train_batch=tb, micro_batch=mb, grad_accum=ga)
    assert needle in str(e.value)


def _write(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_overrides_win_and_are_reported(tmp_path):
    _, base = load_ds_config("zero2")
    run = load_run_config("production").replace(micro_batch=2, grad_accum=8, mixed_precision="no",
                                                max_steps=77)
    eff, notes = effective_ds_config({**base, "train_batch_size": 16}, run, dp_size=2, on_gpu=False)
    batch = (eff["train_batch_size"], eff["train_micro_batch_size_per_gpu"],
             eff["gradient_accumulation_steps"])
    assert batch == (32, 2, 8)
    assert eff["bf16"]["enabled"] is False and "fp16" not in eff
    assert eff["scheduler"]["params"]["total_num_steps"] == 77
    assert eff["optimizer"]["params"]["torch_adam"] is True  # CPU: no FusedAdam build
    assert any("optimizer uses torch AdamW (fused CPU kernel) (the default" in n for n in notes)
    assert any("recomputed" in n for n in notes) and any("mixed precision" in n for n in notes)
    assert base["bf16"]["enabled"] is True, "the loaded JSON must not be mutated"


def test_json_batch_mismatch_is_caught_before_deepspeed(tmp_path):
    cfg = {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
           "gradient_accumulation_steps": 4}
    path = _write(tmp_path, cfg)
    _, loaded = load_ds_config(path)
    run = load_run_config("production").replace(ds_config=path, micro_batch=None, grad_accum=None)
    message = "train_batch_size=10 but micro_batch 4 x grad_accum 4 x data-parallel size 1 = 16"
    with pytest.raises(ConfigError, match=message):
        effective_ds_config(loaded, run, dp_size=1, on_gpu=True)


@pytest.mark.parametrize(
    "cfg,needle",
    [
        ({"train_micro_batch_size_per_gpu": "auto"}, "'auto' at train_micro_batch_size_per_gpu"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
         "'auto' at optimizer.params.lr"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4 must be 0, 1, 2 or 3"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both true"),
        ({"gradient_accumulation_steps": 0},
         "gradient_accumulation_steps=0 must be a positive integer"),
        ({"elasticity": {}}, "section 'elasticity'"),
    ],
)
def test_bad_ds_config(tmp_path, cfg, needle):
    with pytest.raises(ConfigError) as e:
        load_ds_config(_write(tmp_path, cfg))
    assert needle in str(e.value) and "ds.json" in str(e.value)


def test_bad_ds_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no file .*shipped: .*zero2"):
        load_ds_config("zero9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_ds_config(str(bad))


def test_optimizer_choice_needs_no_kernel_build():
    _, base = load_ds_config("zero1")
    run = load_run_config("production")
    cpu, _ = effective_ds_config(base, run, dp_size=1, on_gpu=False)
    gpu, _ = effective_ds_config(base, run, dp_size=1, on_gpu=True)
    # torch's fused AdamW on both: a CUDA kernel and (torch >= 2.4) a CPU kernel, neither needs a
    # build.
    assert (cpu["optimizer"]["params"]["torch_adam"] is True
            and cpu["optimizer"]["params"]["fused"] is True)
    assert (gpu["optimizer"]["params"]["torch_adam"] is True
            and gpu["optimizer"]["params"]["fused"] is True)
    explicit = {**base, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": False}}}
    kept, _ = effective_ds_config(explicit, run, dp_size=1, on_gpu=True)
    assert kept["optimizer"]["params"] == {"lr": 1e-4, "torch_adam": False}
    offload, _ = effective_ds_config(load_ds_config("zero2_offload")[1], run, dp_size=1,
                                     on_gpu=True)
    assert "torch_adam" not in offload["optimizer"]["params"]  # offload uses DeepSpeedCPUAdam


def test_fp16_on_cpu_is_refused():
    _, base = load_ds_config("zero0")
    run = load_run_config("production").replace(mixed_precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        effective_ds_config(base, run, dp_size=1, on_gpu=False)
    eff, _ = effective_ds_config(base, run, dp_size=1, on_gpu=True)
    assert eff["fp16"]["enabled"] and not eff["bf16"]["enabled"]


@pytest.mark.parametrize(
    "impl,on_gpu,expected",
    [
        ("torch", True, {"torch_adam": True}),
        ("torch", False, {"torch_adam": True}),
        ("torch_fused", True, {"torch_adam": True, "fused": True}),
        # torch has a fused CPU AdamW too
        ("torch_fused", False, {"torch_adam": True, "fused": True}),
        ("deepspeed_fused", True, {"torch_adam": False}),
    ],
)
def test_optimizer_impl_switch(impl, on_gpu, expected):
    _, base = load_ds_config("zero1")
    run = load_run_config("production").replace(optimizer_impl=impl)
    eff, notes = effective_ds_config(base, run, dp_size=1, on_gpu=on_gpu)
    chosen = {k: v for k, v in eff["optimizer"]["params"].items() if k in ("torch_adam", "fused")}
    assert chosen == expected
    assert any(f"optimizer_impl={impl}" in n for n in notes)
    # The run config wins over the JSON's own choice (and says so).
    explicit = {**base,
                "optimizer": {"type": "AdamW",
                              "params": {"lr": 1e-4, "torch_adam": False, "fused": False}}}
    eff, _ = effective_ds_config(explicit, run, dp_size=1, on_gpu=on_gpu)
    assert ({k: v for k, v in eff["optimizer"]["params"].items() if k in ("torch_adam", "fused")}
            == expected)


def test_optimizer_impl_cannot_apply_to_offload_or_other_optimizers(tmp_path):
    run = load_run_config("production").replace(optimizer_impl="torch_fused")
    with pytest.raises(ConfigError,
                       match="optimizer_impl='torch_fused' cannot apply: the optimizer is "
                             "offloaded"):
        effective_ds_config(load_ds_config("zero2_offload")[1], run, dp_size=1, on_gpu=True)
    _, base = load_ds_config("zero1")
    sgd = {**base, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    with pytest.raises(ConfigError, match="not Adam/AdamW"):
        effective_ds_config(sgd, run, dp_size=1, on_gpu=True)


def test_wsd_schedule_warms_up_holds_and_decays_to_the_floor():
    from neox_train.train.schedule import wsd_factor

    settings = dict(warmup_num_steps=10, warmup_min_ratio=0.0, min_ratio=0.1,
                    total_num_steps=100, decay_num_steps=20)
    f = [wsd_factor(s, **settings) for s in range(101)]
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5)
    assert all(x == 1.0 for x in f[10:81])  # stable until the decay's first step
    assert f[90] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[80:], f[81:]))


def test_wsd_replaces_the_cosine_with_the_jsons_warmup_and_floor():
    run = RunConfig(ds_config="zero0", max_steps=1000, lr_schedule="wsd", warmup_steps=50)
    cfg, notes = effective_ds_config(load_ds_config("zero0")[1], run, dp_size=1, on_gpu=False)
    assert cfg["scheduler"] == {"type": "WarmupStableDecay", "params": {
        "warmup_num_steps": 50, "warmup_min_ratio": 0.0, "min_ratio": 0.1,
        "total_num_steps": 1000, "decay_num_steps": 200}}
    assert any("WarmupStableDecay" in n for n in notes)
    run = run.replace(decay_steps=300)
    cfg, _ = effective_ds_config(load_ds_config("zero0")[1], run, dp_size=1, on_gpu=False)
    assert cfg["scheduler"]["params"]["decay_num_steps"] == 300
