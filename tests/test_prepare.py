"""`neox-data prepare` end to end on small real corpora: BPE training, sharding, meta.json, re-runs,
the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from neox_train.data.prepare import add_prepare_arguments, main_prepare, prepare, train_tokenizer
from neox_train.data.shards import discover_shards, open_shard, read_meta, validate_shards
from neox_train.data.sources import BUILTIN_CORPORA, iter_documents
from neox_train.errors import DataError


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pydoc_prepared(tmp_path_factory: pytest.TempPathFactory):
    """One prepare of the whole builtin corpus (~0.5 s), shared by the tests that only read its
    output."""
    out = tmp_path_factory.mktemp("pydoc")
    return prepare(["builtin:pydoc"], out, vocab_size=512, shard_tokens=50_000, progress=False)


def test_prepare_builtin_pydoc(pydoc_prepared) -> None:
    result = pydoc_prepared
    out = result.output_dir
    documents = list(BUILTIN_CORPORA["pydoc"]())
    assert result.num_documents == len(documents) > 50
    assert result.vocab_size == 512
    assert result.tokenizer_path == out / "tokenizer.json"
    assert len(result.shards) >= 3
    assert [p.name for p in result.shards] == [
        f"shard_{i:05d}.npy" for i in range(len(result.shards))]

    meta = read_meta(out)
    assert meta == {
        "vocab_size": 512,
        "tokenizer": "tokenizer.json",
        "eos_token_id": 0,
        "num_tokens": result.num_tokens,
        "num_documents": result.num_documents,
        "dtype": "uint16",
        "format": "shards",
        "files": [p.name for p in result.shards],
        "shards": [p.name for p in result.shards],
        "inputs": ["builtin:pydoc"],
        "text_key": "text",
    }

    # The folder is exactly what training reads.
    assert discover_shards(out) == result.shards
    infos = validate_shards(result.shards, vocab_size=512)
    assert all(info.dtype == "uint16" for info in infos)
    assert [info.size for info in infos[:-1]] == [50_000] * (len(infos) - 1)
    assert 0 < infos[-1].size <= 50_000
    assert sum(info.size for info in infos) == result.num_tokens

    tokens = np.concatenate([open_shard(p) for p in result.shards])
    assert int((tokens == 0).sum()) == result.num_documents  # one end-of-text per document
    assert tokens[-1] == 0

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    first_doc_len = int(np.argmax(tokens == 0))
    assert tokenizer.decode(tokens[:first_doc_len].tolist()) == documents[0]
    assert documents[0][:40] in tokenizer.decode(tokens[:200].tolist())


def test_train_tokenizer_is_deterministic() -> None:
    documents = list(BUILTIN_CORPORA["pydoc"]())[:15]
    first = train_tokenizer(iter(documents), 400)
    second = train_tokenizer(iter(documents), 400)
    assert first.to_str() == second.to_str()
    assert first.token_to_id("<|endoftext|>") == 0
    assert first.get_vocab_size() == 400
    # the full byte alphabet is seeded, so text with unseen characters still round-trips
    text = "ünïcødé ✓ 雪"
    assert first.decode(first.encode(text).ids) == text
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_tokenizer(iter(documents), 100)


def test_iter_documents_txt_jsonl_and_directory(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha document\nsecond line\n", encoding="utf-8")
    (corpus / "empty.txt").write_text("  \n", encoding="utf-8")
    _write_jsonl(corpus / "b" / "c.jsonl",
                 [{"text": "gamma", "id": 1}, {"text": ""}, {"text": "delta"}])
    (corpus / "b" / "c.jsonl").write_text((corpus / "b" / "c.jsonl").read_text() + "\n   \n",
                                          encoding="utf-8")
    (corpus / "b" / "ignored.csv").write_text("x,y\n")
    (corpus / "B.txt").write_text("beta")
    single = _write_jsonl(tmp_path / "one.jsonl", [{"text": "epsilon"}])

    docs = list(iter_documents([str(corpus), str(single), str(corpus / "a.txt")]))
    alpha = "alpha document\nsecond line\n"
    assert docs == ["beta", alpha, "gamma", "delta", "epsilon", alpha]
    # a generator per call: the corpus can be read twice (train, then encode)
    assert list(iter_documents([str(single)])) == list(iter_documents([str(single)]))


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"text": "ok"', r"invalid JSON"),
        ('{"body": "no text field"}', r"string 'text' field \(--text-key\), got keys \['body'\]"),
        ('{"text": 42}', r"'text' of type int"),
        ('["text"]', r"got a JSON list"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as err:
        list(iter_documents([str(path)]))
    assert str(err.value).startswith(f"{path}:3: ")
    assert "\n" not in str(err.value)


def test_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = {
        str(tmp_path / "missing.txt"): r"missing\.txt does not exist \(accepted: builtin:NAME, a "
                                       r"\.txt, \.jsonl",
        str(tmp_path / "data.csv"): r"data\.csv: unsupported kind '\.csv' \(accepted:",
        str(tmp_path / "empty_dir"): r"empty_dir: folder holds no \.txt, \.jsonl, .* files",
        "builtin:nope": r"builtin:nope: unknown builtin corpus \(valid: builtin:pydoc\)",
        str(tmp_path / "latin1.txt"): r"latin1\.txt: cannot read as UTF-8",
    }
    for spec, pattern in cases.items():
        with pytest.raises(DataError, match=pattern):
            list(iter_documents([spec]))


def test_prepare_error_in_inputs_propagates_through_tokenizer_training(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare([str(bad)], tmp_path / "out", vocab_size=300, progress=False)


def test_rerun_removes_stale_shards_only(tmp_path: Path) -> None:
    docs = _write_jsonl(tmp_path / "docs.jsonl",
                        [{"text": f"document number {i} " * 20} for i in range(40)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    np.save(out / "other.npy", np.arange(3, dtype=np.uint16))
    first = prepare([str(docs)], out, vocab_size=300, shard_tokens=500, progress=False)
    assert len(first.shards) > 3
    first_tokens = np.concatenate([np.load(path) for path in first.shards])

    second = prepare([str(docs)], out, vocab_size=300, shard_tokens=1_000_000, progress=False)
    assert [p.name for p in second.shards] == ["shard_00000.npy"]
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "notes.txt", "other.npy", "shard_00000.npy", "tokenizer.json"
    ]
    assert second.num_tokens == first.num_tokens
    # same tokenizer, same tokens
    np.testing.assert_array_equal(np.load(out / "shard_00000.npy"), first_tokens)
    assert read_meta(out)["shards"] == ["shard_00000.npy"]


def test_given_tokenizer_is_used_and_copied(tmp_path: Path) -> None:
    docs = _write_jsonl(tmp_path / "docs.jsonl",
                        [{"text": "hello world, hello tokens"}, {"text": "second doc"}])
    tokenizer = train_tokenizer(iter(["hello world " * 50, "tokens and more tokens " * 30]), 300)
    tok_file = tmp_path / "my_tokenizer.json"
    tokenizer.save(str(tok_file))

    result = prepare([str(docs)], tmp_path / "out", tokenizer_path=tok_file, vocab_size=8192,
                     progress=False)
    # the vocab_size argument is ignored; this tiny corpus stops BPE below its 300 target
    assert result.vocab_size == tokenizer.get_vocab_size(with_added_tokens=True) < 300
    assert (tmp_path / "out" / "tokenizer.json").read_text() == tok_file.read_text()
    expected = (tokenizer.encode("hello world, hello tokens").ids + [0]
                + tokenizer.encode("second doc").ids + [0])
    assert np.load(result.shards[0]).tolist() == expected
    assert read_meta(tmp_path / "out")["vocab_size"] == result.vocab_size

    # re-using the output folder's own tokenizer.json works (no copy onto itself)
    again = prepare([str(docs)], tmp_path / "out",
                    tokenizer_path=tmp_path / "out" / "tokenizer.json", progress=False)
    assert again.num_tokens == result.num_tokens


def _word_level_tokenizer(path: Path, words: list[str]) -> Path:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def test_large_vocab_uses_uint32_and_eos_fallback(tmp_path: Path) -> None:
    words = ["<unk>"] + [f"w{i}" for i in range(70_000)] + ["</s>"]
    tok_file = _word_level_tokenizer(tmp_path / "big.json", words)
    docs = tmp_path / "doc.txt"
    docs.write_text("w1 w69999 w5", encoding="utf-8")
    result = prepare([str(docs)], tmp_path / "out", tokenizer_path=tok_file, progress=False)
    shard = np.load(result.shards[0])
    assert shard.dtype == np.uint32
    assert shard.tolist() == [2, 70_000, 6, 70_001]  # "</s>" is the end-of-text token here
    assert read_meta(tmp_path / "out")["dtype"] == "uint32"


def test_tokenizer_errors(tmp_path: Path) -> None:
    docs = tmp_path / "doc.txt"
    docs.write_text("a b", encoding="utf-8")
    no_eos = _word_level_tokenizer(tmp_path / "no_eos.json", ["<unk>", "a", "b"])
    no_eos_message = (r"no_eos\.json: tokenizer has no end-of-text token \(looked for "
                      r"<\|endoftext\|>, </s>, <eos>\)")
    with pytest.raises(DataError, match=no_eos_message):
        prepare([str(docs)], tmp_path / "out", tokenizer_path=no_eos, progress=False)
    broken = tmp_path / "broken.json"
    broken.write_text("{not a tokenizer")
    with pytest.raises(DataError, match=r"broken\.json: cannot load tokenizer"):
        prepare([str(docs)], tmp_path / "out", tokenizer_path=broken, progress=False)
    with pytest.raises(DataError, match=r"missing\.json: cannot load tokenizer"):
        prepare([str(docs)], tmp_path / "out", tokenizer_path=tmp_path / "missing.json",
                progress=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neox-data prepare")
    add_prepare_arguments(parser)
    return parser


def test_cli_arguments_and_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "some text to tokenize " * 10}] * 3)
    out = tmp_path / "out"
    args = _parser().parse_args(
        ["--input", str(docs), str(docs), "--output", str(out),
         "--vocab-size", "300", "--shard-tokens", "1_000", "--json"]
    )
    assert (args.input == [str(docs), str(docs)] and args.shard_tokens == 1000
            and args.tokenizer is None)
    assert main_prepare(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["num_documents"] == 6
    # tiny corpus: BPE runs out of merges
    assert summary["vocab_size"] == read_meta(out)["vocab_size"] <= 300
    assert summary["output_dir"] == str(out)
    assert summary["shards"] == [str(out / "shard_00000.npy")]
    assert "prepared 6 documents" in captured.err and "\n" not in captured.err.strip()

    defaults = _parser().parse_args(["--input", "builtin:pydoc", "--output", str(out)])
    assert (defaults.vocab_size, defaults.shard_tokens, defaults.json) == (8192, 50_000_000, False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--output", "x"],  # --input is required
        ["--input", "a.txt"],  # --output is required
        # below 256 bytes + <|endoftext|>
        ["--input", "a.txt", "--output", "x", "--vocab-size", "256"],
        ["--input", "a.txt", "--output", "x", "--shard-tokens", "0"],
        ["--input", "a.txt", "--output", "x", "--vocab-size", "lots"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_failed_rerun_keeps_previous_output(tmp_path: Path) -> None:
    """Bad input halfway through a re-run (given tokenizer: no first pass to catch it) loses nothing
    saved."""
    docs = _write_jsonl(tmp_path / "docs.jsonl",
                        [{"text": f"document number {i} " * 20} for i in range(40)])
    out = tmp_path / "out"
    first = prepare([str(docs)], out, vocab_size=300, shard_tokens=500, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(f'{{"text": "doc {i}"}}\n' for i in range(300)) + "not json\n",
                   encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:301"):
        prepare([str(bad)], out, tokenizer_path=first.tokenizer_path, shard_tokens=50,
                progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
