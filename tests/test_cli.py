"""The command-line contract: --describe, and one clear line + exit 2 for every bad input, before
training starts."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from neox_train.cli.data import main as data_main
from neox_train.cli.train import main as train_main

from conftest import BIN, VOCAB, markov_tokens, tiny_run_config, train_env


def describe(*args: str) -> dict:
    out = subprocess.run(
        [str(BIN / "neox-train"), *args, "--describe"], capture_output=True, text=True,
        env=train_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_describe_production():
    d = describe("--config", "production")
    assert d["params"] == {"total": 1_414_647_808, "non_embedding": 1_208_602_624}
    assert d["model"]["vocab_size"] == 50304 and d["model"]["tokenizer_vocab_size"] == 50257
    assert d["flops_per_token"] == pytest.approx(
        72 * 24 * 2048**2 * (1 + 2048 / (6 * 2048) + 50304 / (12 * 24 * 2048)))
    assert d["zero_stage"] == 2 and d["precision"] == "bf16"
    ds = d["ds_config"]
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
             ds["train_batch_size"])
    assert batch == (4, 4, 16)
    assert d["run_config"]["save_steps"] == 500 and d["run_config"]["log_steps"] == 100
    assert d["tokens_per_step"] == 16 * 2048


def test_describe_applies_overrides_and_world_size(monkeypatch):
    env = train_env()
    env["WORLD_SIZE"] = "8"
    out = subprocess.run(
        [str(BIN / "neox-train"), "--config", "production", "--ds-config", "zero3", "--micro-batch",
         "2", "--grad-accum", "8", "--mixed-precision", "no", "--max-steps", "123", "--describe"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["zero_stage"] == 3 and d["precision"] == "fp32" and d["data_parallel_size"] == 8
    assert d["ds_config"]["train_batch_size"] == 2 * 8 * 8
    assert d["ds_config"]["scheduler"]["params"]["total_num_steps"] == 123


def _error_line(capsys, argv: list[str], main=train_main) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith(("neox-train: error:", "neox-data: error:"))]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    return lines[0]


def test_bad_config_name(capsys):
    line = _error_line(capsys, ["--config", "prod"])
    assert "neither a preset" in line and "production" in line


def test_bad_field_in_file(capsys, tmp_path):
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"base": "demo", "save_steps": 0, "modle": "x"}))
    line = _error_line(capsys, ["--config", str(p)])
    assert "save_steps=0 is out of range" in line and "unknown field 'modle'" in line


def test_bad_override(capsys):
    line = _error_line(capsys, ["--config", "demo", "--micro-batch", "0"])
    assert "micro_batch=0" in line


def test_auto_in_ds_config(capsys, tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                             "gradient_accumulation_steps": 1}))
    line = _error_line(capsys, ["--config", "demo", "--ds-config", str(p), "--describe"])
    assert "'auto' at train_micro_batch_size_per_gpu" in line


def _bad_shard_dir(tmp_path, kind: str):
    d = tmp_path / "data"
    (d / "nested").mkdir(parents=True)
    np.save(d / "good.npy", markov_tokens(5000))
    bad = d / "nested" / "bad.npy"
    if kind == "dtype":
        np.save(bad, np.arange(100, dtype=np.float32))
    elif kind == "vocab":
        np.save(bad, np.array([1, 2, VOCAB + 7], dtype=np.uint16))
    elif kind == "empty":
        np.save(bad, np.array([], dtype=np.uint16))
    elif kind == "unreadable":
        bad.write_bytes(b"this is not a numpy file")
    return d, bad


@pytest.mark.parametrize(
    "kind,needle",
    [("dtype", "float32"), ("vocab", f"token id {VOCAB + 7} >= vocab size {VOCAB}"),
     ("empty", "empty"), ("unreadable", "bad.npy")],
)
def test_bad_shard_fails_before_training(capsys, tmp_path, kind, needle):
    data, bad = _bad_shard_dir(tmp_path, kind)
    run = tiny_run_config(tmp_path, data)
    line = _error_line(capsys, ["--config", str(run)])
    assert str(bad) in line or bad.name in line
    assert needle in line
    assert not (tmp_path / "ckpt").exists(), "nothing may be written before the input is valid"


def test_missing_data_dir(capsys, tmp_path):
    run = tiny_run_config(tmp_path, tmp_path / "nowhere")
    line = _error_line(capsys, ["--config", str(run)])
    assert "nowhere" in line


def test_resume_without_checkpoint(capsys, tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir)
    line = _error_line(capsys, ["--config", str(run), "--resume", "latest"])
    assert "no checkpoint in" in line
    (tmp_path / "ckpt" / "global_step3").mkdir(parents=True)
    line = _error_line(capsys, ["--config", str(run), "--resume", "global_step9"])
    assert "'global_step9' not found" in line and "incomplete: global_step3" in line
    line = _error_line(capsys, ["--config", str(run), "--resume", "latest"])
    assert "no complete checkpoint" in line and "global_step3" in line


def test_error_exit_code_from_the_real_command(tmp_path):
    out = subprocess.run([str(BIN / "neox-train"), "--config", "nope"], capture_output=True,
                         text=True, env=train_env())
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("neox-train: error: --config 'nope'")
    assert "Traceback" not in out.stderr


def test_neox_data_prepare_json(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} says hello world. " * 20})
                             for i in range(50)))
    out = subprocess.run(
        [str(BIN / "neox-data"), "prepare", "--input", str(src), "--output",
         str(tmp_path / "shards"), "--vocab-size", "300", "--json"],
        capture_output=True, text=True, env=train_env(), timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["num_documents"] == 50 and summary["num_tokens"] > 0
    assert (tmp_path / "shards" / "tokenizer.json").is_file()


def test_neox_data_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    line = _error_line(capsys, ["prepare", "--input", str(bad), "--output", str(tmp_path / "o")],
                       main=data_main)
    # the file and line named
    assert f"{bad}:2: expected a JSON object with a string 'text' field" in line
