"""Checkpoint bookkeeping that needs no engine: tags, resume resolution, retention, compatibility checks."""

import pytest

from neox_train.checkpoint import apply_retention, check_compatible, local_tags, partitioning_change, resolve_resume_tag
from neox_train.config import ConfigError


def make_tags(save_dir, steps, latest):
    for s in steps:
        (save_dir / f"global_step{s}").mkdir(parents=True)
        (save_dir / f"global_step{s}" / "file").write_text("x")
    (save_dir / "latest").write_text(f"global_step{latest}")


def test_tags_sorted_numerically(tmp_path):
    make_tags(tmp_path, [100, 20, 3], latest=100)
    (tmp_path / "not_a_tag").mkdir()
    assert local_tags(tmp_path) == ["global_step3", "global_step20", "global_step100"]
    assert resolve_resume_tag(tmp_path, "latest") == "global_step100"
    assert resolve_resume_tag(tmp_path, "global_step20") == "global_step20"


def test_retention_keeps_newest_and_latest(tmp_path):
    make_tags(tmp_path, [1, 2, 3, 4, 5], latest=5)
    assert apply_retention(tmp_path, 2) == ["global_step1", "global_step2", "global_step3"]
    assert local_tags(tmp_path) == ["global_step4", "global_step5"]
    assert apply_retention(tmp_path, 0) == []


def test_retention_never_deletes_the_latest_pointer_target(tmp_path):
    make_tags(tmp_path, [1, 2, 3], latest=1)
    assert apply_retention(tmp_path, 1) == ["global_step2"]
    assert local_tags(tmp_path) == ["global_step1", "global_step3"]


MODEL = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}


def saved(dp, stage, **model):
    return {"model_config": {**MODEL, **model}, "ds_config": {"zero_optimization": {"stage": stage}}, "dp_size": dp}


def test_compatible_resume_passes():
    check_compatible(saved(2, 2), model_config=MODEL, ds_config={"zero_optimization": {"stage": 2}}, dp_size=2, tag="t")
    # ZeRO-0 holds whole optimizer state on every rank: the rank count may change.
    check_compatible(saved(2, 0), model_config=MODEL, ds_config={"zero_optimization": {"stage": 0}}, dp_size=1, tag="t")


def test_different_model_refused():
    with pytest.raises(ConfigError, match="different model .*hidden_size 128 -> 64"):
        check_compatible(saved(1, 0, hidden_size=128), model_config=MODEL, ds_config={}, dp_size=1, tag="t")


def test_partitioning_change_is_detected_and_only_zero0_refused():
    zero2 = {"zero_optimization": {"stage": 2}}
    # ZeRO-1..3 at another size or stage: convertible (the resume goes through a universal checkpoint).
    check_compatible(saved(2, 2), model_config=MODEL, ds_config=zero2, dp_size=1, tag="t")
    assert partitioning_change(saved(2, 2), ds_config=zero2, dp_size=1) == (
        "saved at data-parallel size 2 with ZeRO-2, this run is 1 with ZeRO-2")
    assert partitioning_change(saved(2, 1), ds_config={"zero_optimization": {"stage": 3}}, dp_size=2) is not None
    assert partitioning_change(saved(2, 2), ds_config=zero2, dp_size=2) is None
    assert partitioning_change(saved(2, 0), ds_config={}, dp_size=1) is None
    # ZeRO-0 holds no partitioned fp32 state to convert from (or into).
    with pytest.raises(ConfigError, match="size 1 with ZeRO-0, this run is 1 with ZeRO-2.*ZeRO-0 checkpoint"):
        check_compatible(saved(1, 0), model_config=MODEL, ds_config=zero2, dp_size=1, tag="t")
    with pytest.raises(ConfigError, match="ZeRO-0"):
        check_compatible(saved(2, 2), model_config=MODEL, ds_config={}, dp_size=2, tag="t")


def test_side_files_carry_tokenizer_and_losses(tmp_path):
    """Each tag is self-describing for an export made elsewhere: model config, run meta with the last losses, and
    the data folder's tokenizer. (The engine here only writes its marker file: the side files are ours.)"""
    import json

    from neox_train.checkpoint import TrainState, client_state, save

    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text('{"model": {}}')
    (data / "meta.json").write_text('{"vocab_size": 300}')

    class Engine:
        def save_checkpoint(self, save_dir, tag, client_state):
            (tmp_path / "ckpt" / tag).mkdir(parents=True)
            (tmp_path / "ckpt" / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")

    state = TrainState(step=7, consumed_samples=56)
    extra = client_state(state=state, run_config={"data_dir": str(data)}, ds_config={}, model_config=MODEL, dp_size=1,
                         data_tokens=100)
    tag = save(Engine(), tmp_path / "ckpt", state, extra, is_rank0=True,
               losses={"train_loss": 3.5, "val_loss": 3.7, "val_loss_step": 5})
    tag_dir = tmp_path / "ckpt" / tag
    run = json.loads((tag_dir / "run.json").read_text())
    assert (run["step"], run["train_loss"], run["val_loss"], run["val_loss_step"]) == (7, 3.5, 3.7, 5)
    assert (tag_dir / "tokenizer.json").read_text() == '{"model": {}}' and (tag_dir / "meta.json").is_file()
    assert json.loads((tag_dir / "config.json").read_text()) == MODEL
