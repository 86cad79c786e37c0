"""gpt-neox/Megatron indexed datasets: what `neox-data prepare --format indexed` writes is read by
megatron-core's own IndexedDataset, what megatron-core's builder writes is read (and trained on)
here, and every kind of damage is one line. Also the prepare inputs teams have (.jsonl.gz,
.jsonl.zst, Parquet, HF save_to_disk), the worker count not changing a byte, and a killed prepare
continuing where it stopped."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from neox_train.data import indexed
from neox_train.data.prepare import prepare
from neox_train.data.shards import discover_shards, open_shard, validate_shards
from neox_train.data.sources import BUILTIN_CORPORA, iter_documents
from neox_train.errors import DataError

from conftest import BIN, markov_tokens, read_metrics, run_train, tiny_run_config, train_env


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.fixture(scope="module")
def pydoc_both(tmp_path_factory):
    """The builtin corpus prepared twice with one tokenizer: as shards and as an indexed dataset."""
    root = tmp_path_factory.mktemp("formats")
    shards = prepare(["builtin:pydoc"], root / "shards", vocab_size=512, shard_tokens=40_000,
                     progress=False)
    idx = prepare(["builtin:pydoc"], root / "indexed", tokenizer_path=shards.tokenizer_path,
                  shard_tokens=40_000, progress=False, format="indexed")
    return shards, idx


def test_what_prepare_writes_is_read_by_megatron_core(pydoc_both):
    shards, idx = pydoc_both
    assert [p.name for p in idx.shards] == ["data.bin", "data.idx"]
    stream = np.concatenate([open_shard(p) for p in shards.shards])
    ds = _megatron().IndexedDataset(str(idx.output_dir / "data"))
    assert len(ds) == idx.num_documents == shards.num_documents
    assert ds.sequence_lengths.sum() == idx.num_tokens == stream.size
    assert ds[0].dtype == np.uint16
    # the same tokens, in order
    assert np.array_equal(np.concatenate([ds[i] for i in range(len(ds))]), stream)
    assert all(int(ds[i][-1]) == 0 for i in range(len(ds)))  # each document ends with end-of-text
    assert np.array_equal(ds.document_indices, np.arange(len(ds) + 1))
    ours = indexed.open_indexed(idx.output_dir / "data")
    assert ours.documents == len(ds) and np.array_equal(ours.tokens, stream)
    assert discover_shards(idx.output_dir) == [idx.output_dir / "data.bin"]


def test_megatron_cores_builder_output_trains_here(tmp_path):
    """Indexed data made by megatron-core (int32, several sequences per document) is a data_dir as
    it is: a folder holding it, or its PREFIX."""
    tokens = markov_tokens(20_000, seed=3)
    prefix = tmp_path / "mega" / "corpus_text_document"
    prefix.parent.mkdir()
    builder = _megatron().IndexedDatasetBuilder(str(prefix.with_suffix(".bin")), dtype=np.int32)
    cuts = np.linspace(0, tokens.size, 41, dtype=np.int64)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        builder.add_item(torch.from_numpy(tokens[a:b].astype(np.int64)))
        if i % 2:
            builder.end_document()
    builder.finalize(str(prefix.with_suffix(".idx")))
    ds = indexed.open_indexed(prefix)
    assert ds.dtype == np.int32 and ds.documents == 20 and np.array_equal(ds.tokens, tokens)
    for data_dir in (prefix, prefix.parent, prefix.with_suffix(".idx")):
        assert discover_shards(data_dir) == [prefix.with_suffix(".bin")]
    run = tiny_run_config(tmp_path, prefix, max_steps=3, save_steps=3, eval_steps=3)
    run_train(["--config", str(run)])
    assert sorted(read_metrics(tmp_path / "logs")) == [1, 2, 3]


def _write_idx(path: Path, *, magic=indexed.MAGIC, version=1, code=8, sizes=(3, 2), pointers=None,
               docs=None, bin_tokens=5, truncate=0) -> Path:
    sizes = np.asarray(sizes, dtype=np.int32)
    itemsize = indexed.DTYPES.get(code, np.dtype(np.uint16)).itemsize
    pointers = np.asarray(pointers if pointers is not None
                          else np.concatenate([[0], np.cumsum(sizes[:-1])]) * itemsize,
                          dtype=np.int64)
    docs = np.asarray(docs if docs is not None else np.arange(sizes.size + 1), dtype=np.int64)
    raw = indexed._HEADER.pack(magic, version, code, sizes.size, docs.size) + sizes.tobytes() \
        + pointers.tobytes() + docs.tobytes()
    path.with_suffix(".idx").write_bytes(raw[:len(raw) - truncate])
    path.with_suffix(".bin").write_bytes(
        np.arange(bin_tokens, dtype=np.uint16).tobytes()[:bin_tokens * itemsize])
    return path


@pytest.mark.parametrize("kw,message", [
    (dict(magic=b"NOTMAGIC!"), "not a gpt-neox/Megatron index"),
    (dict(code=6), "dtype code 6 is ambiguous"),
    (dict(code=7), "dtype code 7 is ambiguous"),
    (dict(code=9),
     "unknown dtype code 9; valid: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16"),
    (dict(version=2), "index version 2; valid: 1"),
    (dict(truncate=8), "a truncated or multimodal index"),
    (dict(bin_tokens=4), "its pointers cover bytes 0..10 of .*holds 8 bytes"),
    (dict(pointers=[0, 100]), "its pointers cover bytes 0..104"),
    (dict(docs=[0, 1]), "document index runs 0..1; valid: 0..2"),
])
def test_damaged_indexed_datasets_are_one_line(tmp_path, kw, message):
    prefix = _write_idx(tmp_path / "bad", **kw)
    with pytest.raises(DataError, match=message) as err:
        indexed.open_indexed(prefix)
    assert "\n" not in str(err.value) and str(tmp_path / "bad") in str(err.value)


def test_a_lone_bin_is_skipped_and_bad_token_ids_are_refused(tmp_path):
    (tmp_path / "lone").mkdir()
    # someone else's .bin: skipped, not data
    (tmp_path / "lone" / "pytorch_model.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError,
                       match=r"no token shards \(\.npy/\.npz, or \.bin/\.idx pairs\) found"):
        discover_shards(tmp_path / "lone")
    for name, docs, vocab, message in (("big", ([1, 2], [300]), 256,
                                        r"big\.bin: token id 300 >= vocab size 256 "
                                        r"at position 2"),
                                       ("neg", ([4], [-5]), 1000,
                                        r"neg\.bin: negative token id -5 at position 1")):
        writer = indexed.IndexedWriter(tmp_path / name, np.int32)
        for doc in docs:
            writer.add_document(np.array(doc))
        writer.close()
        with pytest.raises(DataError, match=message):
            validate_shards(discover_shards(tmp_path / name), vocab)


# -- prepare inputs --------------------------------------------------------------------------------
DOCS = [f"document {i}: " + " ".join(["tokens"] * (i % 7 + 1)) for i in range(50)]


def test_compressed_json_lines_parquet_and_hf_datasets_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    lines = "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": DOCS, "id": list(range(len(DOCS)))}), tmp_path / "a.parquet",
                   row_group_size=7)
    Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "hf"))
    for spec in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet", "hf"):
        assert list(iter_documents([str(tmp_path / spec)], text_key="body")) == DOCS, spec
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(columns: body, id\); give "
                                        r"the text column with --text-key"):
        list(iter_documents([str(tmp_path / "a.parquet")]))
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\)"):
        list(iter_documents([str(tmp_path / "hf")]))
    with pytest.raises(DataError,
                       match=r"a\.jsonl\.gz:1: expected a JSON object with a string 'text' field"):
        list(iter_documents([str(tmp_path / "a.jsonl.gz")]))
    Dataset.from_dict({"text": DOCS}).train_test_split(test_size=0.2, seed=0).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a saved DatasetDict; give one split's folder \(valid: "
                                        r".*dd/test, .*dd/train"):
        list(iter_documents([str(tmp_path / "dd")]))
    (tmp_path / "broken.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"broken\.jsonl\.zst:1: cannot"):
        list(iter_documents([str(tmp_path / "broken.jsonl.zst")]))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "meta.json"}


@pytest.mark.parametrize("fmt", ["shards", "indexed"])
def test_the_worker_count_changes_no_byte(tmp_path, pydoc_both, fmt):
    tok = pydoc_both[0].tokenizer_path
    one = prepare(["builtin:pydoc"], tmp_path / "one", tokenizer_path=tok, shard_tokens=30_000,
                  progress=False, format=fmt, workers=1)
    two = prepare(["builtin:pydoc"], tmp_path / "two", tokenizer_path=tok, shard_tokens=30_000,
                  progress=False, format=fmt, workers=2)
    assert _files(one.output_dir) == _files(two.output_dir) and one.num_tokens == two.num_tokens


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["shards", "indexed"])
def test_a_killed_prepare_continues_where_it_stopped(tmp_path, pydoc_both, fmt, monkeypatch):
    """kill -9 of a real `neox-data prepare` after its first checkpoint; the second run says it
    continues and writes exactly what an uninterrupted run writes."""
    corpus = tmp_path / "corpus.jsonl"
    # ~7000 documents
    docs = [p for d in BUILTIN_CORPORA["pydoc"]() for p in d.split("\n\n") if p.strip()]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = pydoc_both[0].tokenizer_path
    reference = prepare([str(corpus)], tmp_path / "ref", tokenizer_path=tok, shard_tokens=20_000,
                        progress=False, format=fmt)
    env = {**train_env(), "NEOX_PREPARE_CHECKPOINT_TOKENS": "20000"}
    cmd = [str(BIN / "neox-data"), "prepare", "--input", str(corpus), "--output",
           str(tmp_path / "out"), "--tokenizer", str(tok), "--shard-tokens", "20000", "--format",
           fmt, "--workers", "1"]
    progress = tmp_path / "out" / ".prepare-staging" / "progress.json"
    proc = subprocess.Popen(cmd, env={**env, "NEOX_PREPARE_SLOW_S": "3"}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["documents"] > 0:
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["documents"]
    assert 0 < done < len(docs)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing an interrupted prepare" in again.stderr
    assert _files(tmp_path / "out") == _files(reference.output_dir)
    assert not (tmp_path / "out" / ".prepare-staging").exists()
    print(f"\n{fmt}: killed after {done} of {len(docs)} documents; the second run continued from "
          "there")


def test_prepare_cli_formats_and_text_key(tmp_path, pydoc_both):
    lines = "".join(json.dumps({"body": d}) + "\n" for d in DOCS)
    (tmp_path / "in.jsonl").write_text(lines)
    proc = subprocess.run([str(BIN / "neox-data"), "prepare", "--input", str(tmp_path / "in.jsonl"),
                           "--output", str(tmp_path / "out"), "--tokenizer",
                           str(pydoc_both[0].tokenizer_path), "--format", "indexed", "--text-key",
                           "body", "--json"], capture_output=True, text=True,
                          env=train_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "indexed" and summary["num_documents"] == len(DOCS)
    assert "(indexed, vocab 512" in proc.stderr
    assert sys.executable  # the console script ran in this environment


def test_a_prefix_with_dots_and_megatron_caches_beside_it(tmp_path):
    """`c4.en_text_document` is a PREFIX (not `c4` + a suffix), and Megatron-Core's index caches in
    PREFIX/cache/ are never read as shards."""
    prefix = tmp_path / "c4.en_text_document"
    writer = indexed.IndexedWriter(prefix, np.uint16)
    writer.add_document(np.arange(50))
    writer.close()
    cache = tmp_path / "c4.en_text_document" / "cache" / "GPTDataset_indices"
    cache.mkdir(parents=True)
    np.save(cache / "abc-shuffle_index.npy", np.arange(10, dtype=np.uint32))
    for spec in (prefix, Path(f"{prefix}.bin"), Path(f"{prefix}.idx")):
        assert discover_shards(spec) == [Path(f"{prefix}.bin")]
    assert discover_shards(tmp_path) == [Path(f"{prefix}.bin")]
    assert np.array_equal(open_shard(Path(f"{prefix}.bin")), np.arange(50))


def test_a_kill_while_moving_the_output_in_is_finished_by_the_next_run(
        tmp_path, pydoc_both, monkeypatch):
    from neox_train.data import prepare as prep

    tok = pydoc_both[0].tokenizer_path
    reference = prepare(["builtin:pydoc"], tmp_path / "ref", tokenizer_path=tok,
                        shard_tokens=30_000, progress=False)
    real, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped after two files were moved in
        real(src, dst)

    monkeypatch.setattr(prep.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare(["builtin:pydoc"], tmp_path / "out", tokenizer_path=tok, shard_tokens=30_000,
                progress=False)
    monkeypatch.setattr(prep.os, "replace", real)
    again = prepare(["builtin:pydoc"], tmp_path / "out", tokenizer_path=tok, shard_tokens=30_000,
                    progress=False)
    assert _files(again.output_dir) == _files(reference.output_dir)
    assert not (tmp_path / "out" / ".prepare-staging").exists()
