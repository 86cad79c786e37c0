"""Weighted mixtures: the blend (shares, determinism, a prefix for any length), the stream
(rank-disjoint, exact resume, small datasets repeat), the run config's rules, a real run with
per-dataset validation and an exact resume, a changed mixture refused unless asked for, and
`neox-data info`."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from neox_train.config import from_dict
from neox_train.data import indexed
from neox_train.data.mixture import MixtureSplit, MixtureStream, Part, blend, epochs_by
from neox_train.errors import ConfigError

from conftest import (
    BIN,
    copy_checkpoint,
    markov_tokens,
    read_metrics,
    run_train,
    tiny_run_config,
    train_env,
)


def test_the_blend_gives_each_dataset_its_share_in_every_window():
    ids, ordinals = blend([0.7, 0.2, 0.1], 10_000)
    # Weights are normalised: 7, 2, 1 gives the same shares (the order of exact ties may differ in
    # the last bit).
    assert np.array_equal(np.bincount(blend([7, 2, 1], 10_000)[0]), np.bincount(ids))
    assert np.array_equal(blend([0.7, 0.2, 0.1], 100)[0], ids[:100])  # a prefix, for any length
    for start in range(0, 9_900, 997):
        window = ids[start:start + 100]
        counts = np.bincount(window, minlength=3)
        assert np.all(np.abs(counts - np.array([70, 20, 10])) <= 2), (start, counts)
    for d in range(3):  # each dataset's samples come in order 0, 1, 2, ...
        assert np.array_equal(ordinals[ids == d], np.arange((ids == d).sum()))


def _split(sizes=(50, 7), weights=(0.75, 0.25)) -> MixtureSplit:
    parts, base = [], 0
    for i, (n, w) in enumerate(zip(sizes, weights)):
        parts.append(Part(f"d{i}", f"/data/d{i}", w, base, None, range(base, base + n), range(0)))
        base += n + 3  # three validation windows after each part's training windows
    return MixtureSplit(parts)


def test_the_stream_is_rank_disjoint_resumable_and_repeats_a_small_dataset():
    split = _split()
    solo = MixtureStream(split, seed=5, micro_batch=8, dp_rank=0, dp_size=1)
    whole = [solo.next_micro_batch() for _ in range(20)]
    flat = [i for batch in whole for i in batch]
    ranks = [MixtureStream(split, seed=5, micro_batch=4, dp_rank=r, dp_size=2) for r in range(2)]
    paired = [i for _ in range(20) for r in ranks for i in r.next_micro_batch()]
    assert paired == flat  # two ranks take the positions one rank would, without overlap
    resumed = MixtureStream(split, seed=5, micro_batch=8, dp_rank=0, dp_size=1, consumed_samples=80)
    assert [resumed.next_micro_batch() for _ in range(10)] == whole[10:]
    small = [i for i in flat if i >= 53]
    # 7 windows, 40 draws: every window, repeated
    assert len(small) == 40 and set(small) == set(range(53, 60))
    first_epoch = small[:7]
    assert sorted(first_epoch) == list(range(53, 60))  # each pass visits every window once
    rows = epochs_by(split, 160)
    assert [r["samples"] for r in rows] == [120, 40] and rows[1]["epochs"] == pytest.approx(40 / 7)


@pytest.mark.parametrize("data,message", [
    ([{"path": "a", "weight": 0}], r"data\[0\]\.weight=0 must be a number > 0"),
    ([{"path": "a", "weight": -1.5}], r"data\[0\]\.weight=-1\.5 must be a number > 0"),
    ([{"path": "", "weight": 1}], r"data\[0\]\.path='' must be a non-empty string"),
    ([{"path": "a", "weight": 1, "mix": 2}], r"data\[0\] has unknown key\(s\) mix"),
    ([{"path": "x/a", "weight": 1}, {"path": "y/a", "weight": 1}], r"the names a appear twice"),
    ([], r"data=\[\] must be a non-empty list"),
])
def test_bad_mixtures_are_one_line(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"data": data})


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory):
    """An indexed dataset of another Markov chain: 8k tokens, so at its share it repeats."""
    prefix = tmp_path_factory.mktemp("second") / "code"
    writer = indexed.IndexedWriter(prefix, np.uint16)
    tokens = markov_tokens(8_000, seed=11)
    for doc in np.array_split(tokens, 10):
        writer.add_document(doc)
    writer.close()
    return prefix


def _mixture_run(tmp_path, token_dir, second, weights=(3, 1), **kw):
    data = [{"path": str(token_dir), "weight": weights[0], "name": "prose"},
            {"path": str(second), "weight": weights[1]}]
    return tiny_run_config(tmp_path, token_dir, data=data, max_steps=6, save_steps=3, eval_steps=3,
                           **kw)


@pytest.mark.slow
def test_a_mixture_trains_reports_per_dataset_validation_and_resumes_exactly(
        tmp_path, token_dir, second_dataset):
    run = _mixture_run(tmp_path, token_dir, second_dataset)
    first = run_train(["--config", str(run)])
    line = next(x for x in first.stderr.splitlines() if "data mixture:" in x)
    assert ("prose (weight 0.75): 36 samples by max_steps=6" in line
            and "code (weight 0.25): 12 samples" in line)
    evals = read_metrics(tmp_path / "logs", "eval")
    assert {"loss/prose", "loss/code"} <= set(evals[6]) and evals[6]["loss"] > 0
    train = read_metrics(tmp_path / "logs")

    resumed = tmp_path / "resumed"
    copy_checkpoint(tmp_path / "ckpt", resumed / "ckpt", "global_step3")
    again = ["--config", str(run), "--resume", "latest", "--save-dir", str(resumed / "ckpt"),
             "--log-dir", str(resumed / "logs")]
    run_train(again)
    for step, record in read_metrics(resumed / "logs").items():
        assert record["loss"] == pytest.approx(train[step]["loss"], abs=1e-6), step

    (tmp_path / "changed").mkdir()
    changed = _mixture_run(tmp_path / "changed", token_dir, second_dataset, weights=(1, 1),
                           save_dir=str(resumed / "ckpt"),
                           log_dir=str(tmp_path / "changed" / "logs"))
    refused = run_train(["--config", str(changed), "--resume", "global_step6"], check=False)
    assert refused.returncode == 2
    assert ("trained on a different data order (data [" in refused.stderr
            and "--allow-data-change" in refused.stderr)
    allowed = run_train(["--config", str(changed), "--resume", "global_step6",
                         "--allow-data-change", "--max-steps", "7"])
    assert "resumed from" in allowed.stderr


def test_a_missing_mixture_path_is_one_line_before_training(tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir, data=[{"path": str(token_dir), "weight": 1},
                                                    {"path": str(tmp_path / "nowhere"),
                                                     "weight": 1}])
    proc = run_train(["--config", str(run)], check=False)
    assert proc.returncode == 2 and f"data dir {tmp_path / 'nowhere'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_neox_data_info(tmp_path, token_dir, second_dataset):
    proc = subprocess.run([str(BIN / "neox-data"), "info", str(token_dir), str(second_dataset),
                           "--json"], capture_output=True, text=True, env=train_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    shards, code = out["datasets"]
    assert shards["tokens"] == 40_000 and shards["format"] == ["shards"] and shards["files"] == 3
    assert code == {**code, "documents": 10, "tokens": 8_000, "format": ["indexed"],
                    "dtypes": ["uint16"]}
    assert code["max_token_id"] <= 255 and out["total_tokens"] == 48_000
    run = _mixture_run(tmp_path, token_dir, second_dataset)
    proc = subprocess.run([str(BIN / "neox-data"), "info", str(run), "--config", str(run),
                           "--json"],
                          capture_output=True, text=True, env=train_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [d["weight"] for d in out["datasets"]] == [3.0, 1.0]
    assert ([(r["name"], r["samples"]) for r in out["plan"]["datasets"]]
            == [("prose", 36), ("code", 12)])
    bad = subprocess.run([str(BIN / "neox-data"), "info", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=train_env(), timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("neox-data: error: data dir")


def test_a_mixture_of_two_tokenizers_and_data_dir_with_a_mixture_are_refused(tmp_path, token_dir):
    from neox_train.data.prepare import prepare

    a = prepare(["builtin:pydoc"], tmp_path / "a", vocab_size=300, progress=False)
    b = prepare(["builtin:pydoc"], tmp_path / "b", vocab_size=400, progress=False)
    run = tiny_run_config(tmp_path, token_dir, vocab_size=512,
                          data=[{"path": str(a.output_dir), "weight": 1},
                                {"path": str(b.output_dir), "weight": 1}])
    proc = run_train(["--config", str(run)], check=False)
    assert (proc.returncode == 2
            and "the mixture's datasets were tokenized differently" in proc.stderr)
    proc = run_train(["--config", str(run), "--data-dir", str(token_dir)], check=False)
    assert (proc.returncode == 2
            and "trains on a mixture (`data`); give one or the other" in proc.stderr)
