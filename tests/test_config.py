"""Run config: presets, JSON files, and one clear error per bad input naming the field."""

import json

import pytest

from neox_train.config import RUN_PRESETS, RunConfig, field_docs, load_run_config, validate
from neox_train.errors import ConfigError


def test_seed_presets():
    prod = load_run_config("production")
    got = (prod.model, prod.micro_batch, prod.grad_accum, prod.save_steps, prod.log_steps)
    assert got == ("neox-1.2b", 4, 4, 500, 100)
    test = load_run_config("test")
    assert test.max_steps == 1000 and test.save_steps == 200 and test.log_steps == 25
    demo = load_run_config("demo")
    assert demo.model == "neox-demo"
    assert set(RUN_PRESETS) == {"test", "production", "demo"}


def test_every_field_documented():
    assert all(field_docs().values())


def test_frozen_and_replace_validates():
    run = load_run_config("demo")
    with pytest.raises(Exception):
        run.max_steps = 5  # type: ignore[misc]
    assert run.replace(max_steps=5).max_steps == 5 and run.max_steps == 300
    with pytest.raises(ConfigError, match="max_steps=0 is out of range"):
        run.replace(max_steps=0)


def test_json_file_with_base(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"base": "demo", "max_steps": 7, "seq_len": 64}))
    run = load_run_config(str(p))
    assert (run.name, run.model, run.max_steps, run.seq_len) == ("mine", "neox-demo", 7, 64)


@pytest.mark.parametrize(
    "values,needles",
    [
        ({"max_stepz": 3}, ["unknown field 'max_stepz'", "valid fields:"]),
        ({"max_steps": -1}, ["max_steps=-1 is out of range: must be >= 1"]),
        ({"max_steps": "10"}, ["max_steps='10' must be an integer"]),
        ({"model": "neox-7b"}, ["model='neox-7b' is not a preset", "neox-1.2b"]),
        ({"seq_len": 4096}, ["seq_len=4096 exceeds neox-1.2b's max_seq_len 2048"]),
        ({"mixed_precision": "fp8"}, ["mixed_precision='fp8' is not valid"]),
        ({"val_fraction": 0.9}, ["val_fraction=0.9 is out of range"]),
        # all problems at once
        ({"micro_batch": 0, "grad_accum": 0}, ["micro_batch=0", "grad_accum=0"]),
        ({"warmup_steps": 0}, ["warmup_steps=0 is out of range: must be >= 1"]),
        ({"activation_checkpointing": "yes"},
         ["activation_checkpointing='yes' must be true or false"]),
        ({"optimizer_impl": "apex"},
         ["optimizer_impl='apex' is not valid", "torch_fused", "deepspeed_fused"]),
        ({"attention": "flash"},
         ["attention='flash' is not valid (valid: sdpa, eager, flex_attention)"]),
        ({"peak_tflops": 0}, ["peak_tflops=0 must be a number of TFLOP/s > 0"]),
        ({"vocab_pad_multiple": 0}, ["vocab_pad_multiple=0 is out of range: must be >= 1"]),
        ({"prefetch_micro_batches": -1},
         ["prefetch_micro_batches=-1 is out of range: must be >= 0"]),
        ({"compile": ""}, ["compile='' must be a non-empty string or null"]),
        ({"transfer_streams": 0}, ["transfer_streams=0 must be an integer from 1 to 256"]),
        ({"transfer_streams": 257}, ["transfer_streams=257 must be an integer from 1 to 256"]),
        ({"transfer_streams": "16"}, ["transfer_streams='16' must be an integer from 1 to 256"]),
        ({"parallel_uploads": 1}, ["parallel_uploads=1 must be true or false"]),
        ({"profile_steps": "7-5"}, ["profile_steps='7-5' is not a span of steps (valid: A-B"]),
        ({"profile_steps": "5"}, ["profile_steps='5' is not a span of steps"]),
        ({"profile_steps": "0-2"}, ["profile_steps='0-2' is not a span of steps"]),
        ({"memory_snapshot": 0}, ["memory_snapshot=0 is out of range: must be >= 1"]),
        ({"lr_schedule": "linear"}, ["lr_schedule='linear' is not valid (valid: cosine, wsd)"]),
        ({"decay_steps": 20000}, ["decay_steps=20000 is more than max_steps=10000"]),
    ],
)
def test_bad_values_name_the_field(tmp_path, values, needles):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as e:
        load_run_config(str(p))
    msg = str(e.value)
    assert "\n" not in msg and "bad.json" in msg
    for needle in needles:
        assert needle in msg


def test_bad_files(tmp_path):
    # A name that is neither a preset nor a file: test_cli.py::test_bad_config_name, through the
    # command line.
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(str(tmp_path / "nope.json"))
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_run_config(str(p))
    p.write_text('{"base": "huge"}')
    with pytest.raises(ConfigError, match="base='huge' is not a preset"):
        load_run_config(str(p))


def test_defaults_are_valid():
    """The defaults pass the validation a loaded config goes through (RunConfig() itself validates
    nothing), and the validation is not vacuous: one bad field is named."""
    assert validate(RunConfig().to_dict()) == []
    assert (validate({**RunConfig().to_dict(), "save_steps": 0})
            == ["save_steps=0 is out of range: must be >= 1"])


def test_performance_fields_accept_valid_values(tmp_path):
    p = tmp_path / "fast.json"
    p.write_text(json.dumps({"base": "production", "optimizer_impl": "deepspeed_fused",
                             "compile": "inductor", "attention": "eager", "peak_tflops": 989,
                             "vocab_pad_multiple": 64, "prefetch_micro_batches": 0}))
    run = load_run_config(str(p))
    assert run.peak_tflops == 989.0 and isinstance(run.peak_tflops, float)
    assert (run.optimizer_impl, run.compile, run.attention, run.vocab_pad_multiple,
            run.prefetch_micro_batches) == ("deepspeed_fused", "inductor", "eager", 64, 0)
