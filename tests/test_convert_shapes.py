"""`neox-convert-hf` on weights that are not the model their config describes (issue 20, item 8): a
tag without a completeness marker whose config.json was edited, or whose mp_rank_00_model_states.pt
comes from a model of another shape. Every tensor is checked against the shape the config implies
before anything is written: one line, exit 2, no output folder, an existing --out untouched. Without
the check such a tag exported with exit 0 into a folder transformers rejects, or with its embedding
silently cut to the config's vocabulary, and `--verify` died in a RuntimeError traceback.

The checkpoints here are saved directly (a ZeRO-0 tag as DeepSpeed lays it out, no marker): no
training run. The ZeRO-1/2/3 paths read the session's shared training runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

from neox_train.cli import convert
from neox_train.model import hf_config

from conftest import TRAINED_STEPS

TAG = "global_step5"
BIG_VOCAB = 50304  # GPT-NeoX's padded vocabulary: the issue's [50304, 64] embedding
EMBED = "gpt_neox.embed_in.weight"


def save_tag(save_dir: Path, *, weights: dict, config: dict | None = None, edit=None) -> Path:
    """SAVE_DIR/global_step5 as a fp32 ZeRO-0 run saves it (module + client state, config.json,
    run.json with a run id), without its completeness marker. `weights` and `config` are hf_config()
    keyword overrides of neox-tiny: the model whose tensors are saved, and the one config.json
    describes (default: the same). `edit(state)` changes the saved tensors."""
    torch.manual_seed(0)
    model_cfg = hf_config("neox-tiny", weights.pop("vocab_size", 256))
    for key, value in weights.items():
        setattr(model_cfg, key, value)
    state = GPTNeoXForCausalLM(model_cfg).state_dict()
    if edit is not None:
        edit(state)
    described = model_cfg.to_dict()
    described.update(config or {})
    ds_config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}
    tag_dir = save_dir / TAG
    tag_dir.mkdir(parents=True)
    torch.save({"module": state, "ds_config": ds_config, "dp_world_size": 1, "step": 5,
                "model_config": model_cfg.to_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "config.json").write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
    run = {"step": 5, "consumed_samples": 40, "dp_size": 1, "run_id": "run-0123",
           "ds_config": ds_config,
           "run_config": {"model": "neox-tiny", "vocab_size": described["vocab_size"]}}
    (tag_dir / "run.json").write_text(json.dumps(run) + "\n")
    (save_dir / "latest").write_text(TAG)
    return tag_dir


def run_convert(capfd, *args) -> tuple[int, str]:
    code = convert.main([*map(str, args)])
    return code, capfd.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("neox-convert-hf: error: ")]


def _drop_head(state: dict) -> None:
    del state["lm_head.weight"]


def _add_tensor(state: dict) -> None:
    state["gpt_neox.layers.1.attention.masked_bias"] = torch.zeros(1)


# case: (weights, config.json overrides, saved-tensor edit, extra flags, the one line's expected
# text)
MISMATCHED = {
    # config.json cut to 512 tokens: the export's embedding was cut from [50304, 64] to [512, 64],
    # exit 0.
    "vocab": (dict(vocab_size=BIG_VOCAB), dict(vocab_size=512), None, (),
              f"{EMBED} has shape [50304, 64] in mp_rank_00_model_states.pt, but its config.json "
              "(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2) "
              "expects [512, 64]"),
    # the same with --verify: a RuntimeError traceback from load_state_dict.
    "vocab-verify": (dict(vocab_size=BIG_VOCAB), dict(vocab_size=512), None, ("--verify",),
                     f"{EMBED} has shape [50304, 64] in mp_rank_00_model_states.pt, but its "
                     "config.json "),
    # a model-states file from a narrower model: exit 0 and a folder from_pretrained rejects.
    "hidden": (dict(hidden_size=32), dict(hidden_size=64), None, (),
               f"{EMBED} has shape [256, 32] in mp_rank_00_model_states.pt, but its config.json "
               "(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2) "
               "expects [256, 64]; the config and the weights are of different models (25 more "
               "tensors differ)"),
    "intermediate": (dict(intermediate_size=128), dict(intermediate_size=256), None,
                     ("--unpad-vocab",),
                     "has shape [128, 64] in mp_rank_00_model_states.pt, but its config.json"),
    "more-layers": (dict(num_hidden_layers=2), dict(num_hidden_layers=3), None, (),
                    "the tensors in mp_rank_00_model_states.pt are not the ones its config.json "
                    "(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=3) "
                    "implies: missing gpt_neox.layers.2.input_layernorm.weight, "),
    # a config no model can be built from: a transformers validation traceback.
    "unbuildable": (dict(), dict(num_attention_heads=5), None, (),
                    "transformers cannot build a GPTNeoX model from its config.json "
                    "(StrictDataclass"),
    "missing-tensor": (dict(), None, _drop_head, (),
                       "missing lm_head.weight (1 in all); unexpected none"),
    "extra-tensor": (dict(), None, _add_tensor, (),
                     "missing none; unexpected gpt_neox.layers.1.attention.masked_bias (1 in all)"),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_weights_of_another_shape_are_one_line_and_write_nothing(tmp_path, capfd, case):
    weights, config, edit, flags, message = MISMATCHED[case]
    tag_dir = save_tag(tmp_path / "ckpt", weights=dict(weights), config=config, edit=edit)
    out = tmp_path / "hf"
    code, err = run_convert(capfd, tmp_path / "ckpt", "--tag", TAG, "--out", out, *flags)
    assert code == 2, err
    assert len(error_lines(err)) == 1, err
    line = error_lines(err)[0]
    assert (line.startswith(f"neox-convert-hf: error: checkpoint {tag_dir}: ")
            and message in line), line
    assert "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    # An existing --out is not touched, even with --overwrite.
    out.mkdir()
    (out / "stale.txt").write_text("old")
    # the tag folder itself
    code, err = run_convert(capfd, tag_dir, "--out", out, "--overwrite", *flags)
    assert code == 2 and error_lines(err)[-1] == line
    assert ([p.name for p in out.iterdir()] == ["stale.txt"]
            and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"])


def test_a_matching_directly_saved_tag_converts_and_verifies(tmp_path, capfd):
    """The control: the same construction, config and weights of one model, exports and passes
    --verify."""
    save_tag(tmp_path / "ckpt", weights=dict(vocab_size=384))
    code, err = run_convert(capfd, tmp_path / "ckpt", "--tag", TAG, "--out", tmp_path / "hf",
                            "--verify", "--unpad-vocab")
    assert code == 0, err
    assert "has no completeness marker" in err and not error_lines(err)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert tuple(model.get_input_embeddings().weight.shape) == (384, 64)


@pytest.mark.slow  # reads the session's shared training runs (conftest.trained_run)
@pytest.mark.parametrize("stage,precision", [(2, "no"), (3, "bf16")])
def test_zero_fp32_masters_of_another_shape_are_refused(trained_run, tmp_path, capfd, stage,
                                                        precision):
    """ZeRO-1/2/3: zero_to_fp32 takes the shapes from the checkpoint itself; a config.json of
    another width is refused on those shapes before any master is gathered."""
    tag = f"global_step{TRAINED_STEPS}"
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained_run(stage, 1, precision) / "ckpt" / tag, save_dir / tag)
    for marker in (save_dir / tag).glob(".neox-complete*"):
        marker.unlink()
    config = json.loads((save_dir / tag / "config.json").read_text())
    (save_dir / tag / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    code, err = run_convert(capfd, save_dir, "--out", tmp_path / "hf", "--tag", tag, "--verify")
    assert code == 2, err
    line = error_lines(err)[-1]
    assert (f"{EMBED} has shape [256, 64] in its ZeRO-{stage} fp32 master weights, but its "
            "config.json" in line), line
    assert "expects [256, 32]" in line and not (tmp_path / "hf").exists()
