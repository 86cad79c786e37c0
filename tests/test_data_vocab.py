"""A dataset's meta.json and the token-id check are the same whichever way the dataset is named: its
folder, an indexed PREFIX, PREFIX.bin, PREFIX.idx, or a mixture entry holding any of those (issue
20, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neox_train.config import from_dict
from neox_train.data import indexed
from neox_train.data.info import describe
from neox_train.data.shards import dataset_folder, read_meta, resolve_vocab
from neox_train.errors import DataError
from neox_train.train import plan as plan_mod

from conftest import run_train, tiny_run_config

META_VOCAB, BAD_ID, BAD_AT = 512, 600, 5


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """D/data.bin + D/data.idx + D/meta.json, as `neox-data prepare --format indexed` lays them out,
    whose tokens go past meta.json's vocabulary (ids the tokenizer cannot have made, yet below
    GPT-2's 50257)."""
    folder = tmp_path / "D"
    folder.mkdir()
    writer = indexed.IndexedWriter(folder / "data", np.uint16)
    writer.add_document(np.arange(BAD_AT))
    writer.add_document(np.array([BAD_ID, 1, 2, 0]))
    writer.add_document(np.arange(300) % 200)
    writer.close()
    (folder / "meta.json").write_text(json.dumps({"vocab_size": META_VOCAB,
                                                  "tokenizer": "tokenizer.json", "eos_token_id": 0,
                                                  "format": "indexed"}))
    return folder


NAMINGS = ["{D}", "{D}/data", "{D}/data.bin", "{D}/data.idx"]


def _run(spec: str, *, mixture: bool):
    values = {"model": "neox-tiny", "seq_len": 16, "ds_config": "zero0", "mixed_precision": "no"}
    values.update({"data": [{"path": spec, "weight": 1}]} if mixture else {"data_dir": spec})
    return from_dict(values)


@pytest.mark.parametrize("mixture", [False, True], ids=["data_dir", "mixture"])
@pytest.mark.parametrize("naming", NAMINGS)
def test_every_naming_takes_the_vocabulary_from_meta_json_and_refuses_ids_beyond_it(
        prepared, naming, mixture):
    spec = naming.format(D=prepared)
    plan = plan_mod.prepare_run(_run(spec, mixture=mixture), dp_size=1, on_gpu=False)
    assert plan.tokenizer_vocab_size == META_VOCAB
    with pytest.raises(DataError) as err:
        plan_mod.load_data(plan)
    message = str(err.value)
    assert message == (f"shard {prepared / 'data.bin'}: token id {BAD_ID} >= vocab size "
                       f"{META_VOCAB} at position {BAD_AT} (valid ids are 0..{META_VOCAB - 1})")


@pytest.mark.parametrize("naming", NAMINGS)
def test_meta_json_is_found_beside_a_prefix_as_in_its_folder(prepared, naming):
    spec = naming.format(D=prepared)
    assert dataset_folder(spec) == prepared
    assert read_meta(spec) == read_meta(prepared) is not None
    assert resolve_vocab(None, spec) == resolve_vocab(None, prepared)
    assert resolve_vocab(1000, spec) == (1000, read_meta(prepared))
    assert describe(spec)["vocab_size"] == META_VOCAB


def test_a_prefix_wins_over_a_folder_of_its_name_and_a_bare_prefix_has_no_meta(tmp_path):
    """Megatron-Core keeps caches in PREFIX/: naming PREFIX means the dataset beside it, not that
    folder; and a PREFIX with no meta.json beside it (a Megatron dataset) falls back to the default
    vocabulary, as a folder does."""
    writer = indexed.IndexedWriter(tmp_path / "corpus", np.uint16)
    writer.add_document(np.arange(40))
    writer.close()
    (tmp_path / "corpus" / "cache").mkdir(parents=True)
    # not this dataset's
    (tmp_path / "corpus" / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    assert dataset_folder(tmp_path / "corpus") == tmp_path
    assert read_meta(tmp_path / "corpus") is None
    assert resolve_vocab(None, tmp_path / "corpus") == resolve_vocab(None, tmp_path)
    assert (dataset_folder(tmp_path / "nowhere") == tmp_path / "nowhere"
            and read_meta(tmp_path / "nowhere") is None)


def test_a_damaged_meta_json_beside_a_prefix_is_one_line(prepared):
    (prepared / "meta.json").write_text(json.dumps({"vocab_size": "many"}))
    for naming in NAMINGS:
        with pytest.raises(DataError,
                           match=r"meta\.json: vocab_size is 'many'; valid: a non-negative "
                                 r"integer$"):
            resolve_vocab(None, naming.format(D=prepared))


def test_neox_train_on_a_prefix_refuses_ids_beyond_meta_json_before_training(tmp_path, prepared):
    """The issue's command: `neox-train --data-dir D/data` exits 2 with one line, as `--data-dir D`
    does."""
    run = tiny_run_config(tmp_path, prepared, vocab_size=None)
    proc = run_train(["--config", str(run), "--data-dir", str(prepared / "data")], check=False,
                     timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"token id {BAD_ID} >= vocab size {META_VOCAB}" in proc.stderr
            and "Traceback" not in proc.stderr)
    assert not (tmp_path / "ckpt").exists()


def test_a_mixture_entry_named_by_its_prefix_is_checked_for_one_tokenizer(tmp_path, prepared):
    """A mixture's datasets must agree on meta.json whichever way each is named; a folder with
    another vocabulary beside the PREFIX entry is refused as it is beside the folder entry."""
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "a.npy", np.arange(100, dtype=np.uint16))
    (other / "meta.json").write_text(json.dumps({"vocab_size": 1000, "eos_token_id": 0}))
    with pytest.raises(DataError, match="tokenized differently"):
        plan_mod.check_one_tokenizer([str(other), str(prepared)])
    with pytest.raises(DataError, match="tokenized differently"):
        plan_mod.check_one_tokenizer([str(other), str(prepared / "data")])
