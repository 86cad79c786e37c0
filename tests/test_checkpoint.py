"""Checkpoint bookkeeping that needs no engine: tags, the local commit (marker, `latest`),
retention, compatibility checks."""

import json

import pytest
import torch

from neox_train.checkpoint.local import commit, train_state
from neox_train.checkpoint.local.tags import local_tags, step_of_tag
from neox_train.checkpoint.local.train_state import (
    apply_retention,
    check_compatible,
    partitioning_change,
)
from neox_train.errors import ConfigError


def make_tags(save_dir, steps, latest):
    """Complete (committed) tags; `latest` then points where the test says."""
    for s in steps:
        (save_dir / f"global_step{s}").mkdir(parents=True)
        (save_dir / f"global_step{s}" / "file").write_text("x")
        commit.commit(save_dir, f"global_step{s}", run_id="0123456789ab")
    (save_dir / "latest").write_text(f"global_step{latest}")


def test_tags_sorted_numerically(tmp_path):
    make_tags(tmp_path, [100, 20, 3], latest=100)
    (tmp_path / "not_a_tag").mkdir()
    (tmp_path / "global_step7.damaged-1234").mkdir()
    assert local_tags(tmp_path) == ["global_step3", "global_step20", "global_step100"]
    assert step_of_tag("global_step0") == 0 and step_of_tag("latest") is None


def test_retention_keeps_newest_and_latest(tmp_path):
    make_tags(tmp_path, [1, 2, 3, 4, 5], latest=5)
    assert apply_retention(tmp_path, 2) == ["global_step1", "global_step2", "global_step3"]
    assert local_tags(tmp_path) == ["global_step4", "global_step5"]
    assert apply_retention(tmp_path, 0) == []


def test_retention_never_deletes_the_latest_pointer_target(tmp_path):
    make_tags(tmp_path, [1, 2, 3], latest=1)
    assert apply_retention(tmp_path, 1) == ["global_step2"]
    assert local_tags(tmp_path) == ["global_step1", "global_step3"]


def test_retention_counts_only_complete_tags_and_leaves_torn_ones(tmp_path):
    make_tags(tmp_path, [1, 2, 3], latest=3)
    (tmp_path / "global_step4").mkdir()  # a save killed half-way: no marker
    (tmp_path / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert apply_retention(tmp_path, 2) == ["global_step1"]
    assert local_tags(tmp_path) == ["global_step2", "global_step3", "global_step4"]


# -- the local commit ------------------------------------------------------------------------------
def test_commit_marks_every_file_and_moves_latest(tmp_path):
    tag = tmp_path / "global_step9"
    (tag / "zero").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (tag / "zero" / "optim.pt").write_bytes(b"o" * 7)
    status = commit.commit(tmp_path, "global_step9", run_id="0123456789ab")
    assert (tmp_path / "latest").read_text() == "global_step9"
    marker = json.loads((tag / commit.MARKER).read_text())
    assert sorted(marker["files"]) == ["mp_rank_00_model_states.pt", "zero/optim.pt"]
    assert marker["run_id"] == "0123456789ab" and marker["step"] == 9
    assert commit.inspect(tmp_path, "global_step9") == status and status.complete
    assert commit.verify(tmp_path, status) == ""
    assert not [p for p in tmp_path.rglob("*") if commit.TMP_MARK in p.name]


@pytest.mark.parametrize("damage, problem", [
    (lambda t: (t / "a.pt").unlink(), "a.pt is missing"),
    (lambda t: (t / "a.pt").write_bytes(b"short"), "a.pt has 5 bytes, its marker says 10"),
    (lambda t: (t / "stray.pt").write_bytes(b"?"), "stray.pt is not in its completeness marker"),
    (lambda t: (t / commit.MARKER).write_text("{"), "is unreadable"),
    (lambda t: (t / commit.MARKER).unlink(), "no completeness marker"),
])
def test_inspect_names_what_makes_a_tag_incomplete(tmp_path, damage, problem):
    (tmp_path / "global_step1").mkdir()
    (tmp_path / "global_step1" / "a.pt").write_bytes(b"a" * 10)
    commit.commit(tmp_path, "global_step1", run_id=None)
    damage(tmp_path / "global_step1")
    status = commit.inspect(tmp_path, "global_step1")
    assert not status.complete and problem in status.problem


def test_verify_reads_the_content(tmp_path):
    (tmp_path / "global_step1").mkdir()
    (tmp_path / "global_step1" / "a.pt").write_bytes(b"a" * 10)
    commit.commit(tmp_path, "global_step1", run_id=None)
    (tmp_path / "global_step1" / "a.pt").write_bytes(b"b" * 10)  # same size: only the crc32c tells
    status = commit.inspect(tmp_path, "global_step1")
    assert status.complete and "a.pt has crc32c" in commit.verify(tmp_path, status)


def test_a_tag_from_before_markers_counts_when_its_side_files_parse(tmp_path):
    legacy = tmp_path / "global_step5"
    legacy.mkdir()
    (legacy / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (legacy / "config.json").write_text("{}")
    (legacy / "run.json").write_text(json.dumps({"step": 5}))
    status = commit.inspect(tmp_path, "global_step5")
    assert status.complete and status.legacy and commit.verify(tmp_path, status) == ""
    (legacy / "run.json").write_text("")  # torn: the old save order wrote run.json last
    assert not commit.inspect(tmp_path, "global_step5").complete


@pytest.mark.parametrize("content, why", [(None, "is missing"), (b"", "is empty"),
                                          (b"\xff\xfe", "is not text"),
                                          (b"../etc", "not a checkpoint tag"),
                                          (b"global_step3\n", "")])
def test_read_latest_never_raises(tmp_path, content, why):
    if content is not None:
        (tmp_path / "latest").write_bytes(content)
    tag, problem = commit.read_latest(tmp_path)
    assert (tag, why in problem) == (("global_step3" if not why else None), True)


MODEL = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 256}


def saved(dp, stage, **model):
    return {"model_config": {**MODEL, **model},
            "ds_config": {"zero_optimization": {"stage": stage}}, "dp_size": dp}


def test_compatible_resume_passes():
    """The same model, stage and rank count resumes as it is (nothing to convert); so does ZeRO-0 at
    another rank count, which holds whole optimizer state on every rank. The same ZeRO-0 checkpoint
    under ZeRO-2 is refused, so the pass is not vacuous."""
    zero2, zero0 = {"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 0}}
    assert (check_compatible(saved(2, 2), model_config=MODEL, ds_config=zero2, dp_size=2, tag="t")
            is None)
    assert partitioning_change(saved(2, 2), ds_config=zero2, dp_size=2) is None
    assert (check_compatible(saved(2, 0), model_config=MODEL, ds_config=zero0, dp_size=1, tag="t")
            is None)
    assert partitioning_change(saved(2, 0), ds_config=zero0, dp_size=1) is None
    with pytest.raises(ConfigError, match="ZeRO-0 checkpoint"):
        check_compatible(saved(2, 0), model_config=MODEL, ds_config=zero2, dp_size=1, tag="t")


def test_different_model_refused():
    with pytest.raises(ConfigError, match="different model .*hidden_size 128 -> 64"):
        check_compatible(saved(1, 0, hidden_size=128), model_config=MODEL, ds_config={}, dp_size=1,
                         tag="t")


def test_partitioning_change_is_detected_and_only_zero0_refused():
    zero2 = {"zero_optimization": {"stage": 2}}
    # ZeRO-1..3 at another size or stage: convertible (the resume goes through a universal
    # checkpoint).
    check_compatible(saved(2, 2), model_config=MODEL, ds_config=zero2, dp_size=1, tag="t")
    assert partitioning_change(saved(2, 2), ds_config=zero2, dp_size=1) == (
        "saved at data-parallel size 2 with ZeRO-2, this run is 1 with ZeRO-2")
    assert partitioning_change(saved(2, 1), ds_config={"zero_optimization": {"stage": 3}},
                               dp_size=2) is not None
    assert partitioning_change(saved(2, 2), ds_config=zero2, dp_size=2) is None
    assert partitioning_change(saved(2, 0), ds_config={}, dp_size=1) is None
    # ZeRO-0 holds no partitioned fp32 state to convert from (or into).
    with pytest.raises(ConfigError,
                       match="size 1 with ZeRO-0, this run is 1 with ZeRO-2.*ZeRO-0 checkpoint"):
        check_compatible(saved(1, 0), model_config=MODEL, ds_config=zero2, dp_size=1, tag="t")
    with pytest.raises(ConfigError, match="ZeRO-0"):
        check_compatible(saved(2, 2), model_config=MODEL, ds_config={}, dp_size=2, tag="t")


def test_side_files_carry_tokenizer_and_losses(tmp_path):
    """Each tag is self-describing for an export made elsewhere: model config, run meta with the
    last losses, and the data folder's tokenizer. (The engine here only writes its marker file: the
    side files are ours.)"""
    import json

    from neox_train.checkpoint.local import commit
    from neox_train.checkpoint.local.train_state import TrainState, client_state, write_side_files

    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text('{"model": {}}')
    (data / "meta.json").write_text('{"vocab_size": 300}')

    state = TrainState(step=7, consumed_samples=56)
    extra = client_state(state=state, run_config={"data_dir": str(data)}, ds_config={},
                         model_config=MODEL, dp_size=1, data_tokens=100)
    tag_dir = tmp_path / "ckpt" / "global_step7"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")  # what the engine wrote
    write_side_files(tag_dir, extra, run_id="0123456789ab",
                     losses={"train_loss": 3.5, "val_loss": 3.7, "val_loss_step": 5})
    status = commit.commit(tmp_path / "ckpt", "global_step7", run_id="0123456789ab")
    tag_dir = tmp_path / "ckpt" / status.tag
    assert status.complete and (tmp_path / "ckpt" / "latest").read_text() == "global_step7"
    assert set(status.files) == {"mp_rank_00_model_states.pt", "config.json", "run.json",
                                 "tokenizer.json", "meta.json"}
    run = json.loads((tag_dir / "run.json").read_text())
    assert ((run["step"], run["train_loss"], run["val_loss"], run["val_loss_step"])
            == (7, 3.5, 3.7, 5))
    assert run["run_id"] == "0123456789ab"
    assert ((tag_dir / "tokenizer.json").read_text() == '{"model": {}}'
            and (tag_dir / "meta.json").is_file())
    assert json.loads((tag_dir / "config.json").read_text()) == MODEL


def test_deepspeeds_loader_reads_the_model_states_once(tmp_path):
    """Issue 22 item 2: DeepSpeed's SDLoader reads the model-states file twice per load (a whole
    torch.load only to check mp_world_size, then the load itself); inside each_file_read_once
    (train_state.load) the file is read once, and the checkpoint engine is left as it was."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.state_dict_factory import SDLoaderFactory

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.arange(4.0)}, "mp_world_size": 1}, path)
    reads = []

    class Counting(TorchCheckpointEngine):
        def load(self, p, map_location=None):
            reads.append(p)
            return super().load(p, map_location=map_location)

    engine = SimpleNamespace(checkpoint_engine=Counting())

    def load_as_deepspeed_does():  # DeepSpeedEngine._load_checkpoint's two steps
        loader = SDLoaderFactory.get_sd_loader([str(path)],
                                               checkpoint_engine=engine.checkpoint_engine)
        return loader.load(1, 0)[1]

    load_as_deepspeed_does()
    assert len(reads) == 2  # DeepSpeed's own behaviour: the reason for the memo
    reads.clear()
    with train_state.each_file_read_once(engine):
        state = load_as_deepspeed_does()
        assert len(reads) == 1 and torch.equal(state["module"]["w"], torch.arange(4.0))
        load_as_deepspeed_does()  # the memo serves one second read, not a third
        assert len(reads) == 2
    assert "load" not in vars(engine.checkpoint_engine)
