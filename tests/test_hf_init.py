"""`--init-from-hf DIR`: training starts from a HuggingFace GPTNeoX folder's weights, at ZeRO-0 and
under ZeRO-3's partitioned construction; a folder of the wrong shape is refused with one line before
anything is built."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from neox_train.errors import ConfigError
from neox_train.model import build_model, check_hf_init, hf_config, padded_vocab_size

from conftest import BIN, VOCAB, run_train, test_ds_config, tiny_run_config, train_env


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A neox-tiny export whose weights differ from any seed's init (so a fresh init cannot pass for
    a load)."""
    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(99)
    model = build_model(hf_config("neox-tiny", padded_vocab_size(VOCAB)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


def _hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_training_starts_from_the_hf_weights(tmp_path, token_dir, hf_dir, stage):
    # lr ~0: after one step the checkpoint must still hold the HF weights, so the comparison is
    # exact to fp32.
    run = tiny_run_config(
        tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, stage, lr=1e-12)), max_steps=1,
        save_steps=1, eval_steps=0, init_from_hf=str(hf_dir),
    )
    proc = run_train(["--config", str(run)])
    assert "initialised the model from the HuggingFace folder" in proc.stderr
    tag = tmp_path / "ckpt" / "global_step1"
    if stage == 0:
        saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        saved = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="global_step1")
    expected = _hf_weights(hf_dir)
    compared = 0
    for name, value in saved.items():
        if name in expected:
            torch.testing.assert_close(value.float(), expected[name], rtol=0, atol=1e-6, msg=name)
            compared += 1
    assert (compared
            >= len([k for k in expected if "rotary" not in k and "masked_bias" not in k]) - 2)


def test_shape_mismatch_isone_line(tmp_path, hf_dir):
    ours = hf_config("neox-demo", padded_vocab_size(VOCAB))
    with pytest.raises(ConfigError, match=r"does not match the run's model: hidden_size=") as err:
        check_hf_init(str(hf_dir), ours, model_name="neox-demo")
    assert "\n" not in str(err.value)
    unpadded = hf_config("neox-tiny", padded_vocab_size(VOCAB) + 128)
    with pytest.raises(ConfigError, match="vocab_size=.*--unpad-vocab"):
        check_hf_init(str(hf_dir), unpadded, model_name="neox-tiny")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: None, "is not a folder"),
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{")), "not valid JSON"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps({"model_type": "llama"}))),
         "model_type='llama'"),
        (lambda d: (d.mkdir(),
                    (d / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))),
         "holds no weights"),
    ],
    ids=["missing", "no-config", "bad-json", "not-neox", "no-weights"],
)
def test_bad_folders(tmp_path, make, message):
    folder = tmp_path / "hf"
    make(folder)
    with pytest.raises(ConfigError, match=message):
        check_hf_init(str(folder), hf_config("neox-tiny", padded_vocab_size(VOCAB)),
                      model_name="neox-tiny")


def test_cli_refuses_before_building_anything(tmp_path, token_dir, hf_dir):
    run = tiny_run_config(tmp_path, token_dir, model="neox-demo", init_from_hf=str(hf_dir))
    proc = subprocess.run([str(BIN / "neox-train"), "--config", str(run), "--describe"],
                          capture_output=True, text=True, env=train_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("neox-train: error: init_from_hf=") and "hidden_size=" in last
    assert not (tmp_path / "ckpt").exists()
