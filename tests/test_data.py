"""Shards -> windows -> sample stream, on small real files in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neox_train.data import shards as data
from neox_train.data.shards import discover_shards, open_shard, read_meta, validate_shards
from neox_train.data.windows import PackedWindows, SampleStream, eval_batches, split_windows
from neox_train.errors import DataError


def _tokens(n: int, dtype: str = "uint16", start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n) % 1000).astype(dtype)


# --- discovery ------------------------------------------------------------------------------------


def test_discover_shards_recursive_and_sorted(tmp_path: Path) -> None:
    for rel in ["b/z.npy", "a/2/x.npz", "a/10.npy", "c.npy", "a/1/y.npy"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")
    (tmp_path / "meta.json").write_text("{}")
    found = [p.relative_to(tmp_path).as_posix() for p in discover_shards(tmp_path)]
    assert found == ["a/1/y.npy", "a/10.npy", "a/2/x.npz", "b/z.npy", "c.npy"]
    assert discover_shards(str(tmp_path)) == discover_shards(tmp_path)


def test_discover_shards_errors(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no token shards .* found under") as err:
        discover_shards(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        discover_shards(tmp_path / "missing")


# --- opening shards -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_open_npy_is_memmap(tmp_path: Path, dtype: str) -> None:
    tokens = _tokens(100, dtype)
    if dtype == "uint32":
        tokens[5] = 70_000
    np.save(tmp_path / "s.npy", tokens)
    arr = open_shard(tmp_path / "s.npy")
    assert isinstance(arr, np.memmap)
    assert arr.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arr, tokens)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_open_npz_stored_is_memmap(tmp_path: Path, dtype: str) -> None:
    tokens = _tokens(257, dtype, start=3)
    # another member before input_ids, so its offset inside the zip is not the first header
    np.savez(tmp_path / "s.npz", other=np.zeros(7), input_ids=tokens)
    arr = open_shard(tmp_path / "s.npz")
    assert isinstance(arr, np.memmap)
    assert arr.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arr, tokens)


def test_open_npz_compressed_is_loaded(tmp_path: Path) -> None:
    tokens = _tokens(500, "uint32")
    np.savez_compressed(tmp_path / "s.npz", input_ids=tokens)
    arr = open_shard(tmp_path / "s.npz")
    assert not isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, tokens)


def test_open_2d_is_flattened_row_major(tmp_path: Path) -> None:
    rows = _tokens(12).reshape(3, 4)
    np.save(tmp_path / "a.npy", rows)
    np.savez(tmp_path / "b.npz", input_ids=rows)
    np.save(tmp_path / "c.npy", np.asfortranarray(rows))
    np.savez(tmp_path / "d.npz", input_ids=np.asfortranarray(rows))
    # a C-ordered 2-D shard stays mapped
    assert isinstance(open_shard(tmp_path / "a.npy"), np.memmap)
    for name in ("a.npy", "b.npz", "c.npy", "d.npz"):
        arr = open_shard(tmp_path / name)
        assert arr.shape == (12,)
        np.testing.assert_array_equal(arr, rows.reshape(-1))


def _bad_shards(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, regex the message must match)."""
    cases: dict[str, tuple[Path, str]] = {}

    def add(name: str, path: Path, pattern: str) -> None:
        cases[name] = (path, pattern)

    np.save(tmp_path / "int64.npy", np.arange(10, dtype=np.int64))
    add("int64", tmp_path / "int64.npy", r"dtype is int64; valid: uint16, uint32")
    np.save(tmp_path / "float32.npy", np.ones(10, dtype=np.float32))
    add("float32", tmp_path / "float32.npy", r"dtype is float32")
    np.savez(tmp_path / "int64.npz", input_ids=np.arange(10, dtype=np.int64))
    add("int64 npz", tmp_path / "int64.npz", r"dtype is int64")
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.uint16))
    add("empty", tmp_path / "empty.npy", r"empty")
    np.savez(tmp_path / "empty.npz", input_ids=np.zeros(0, dtype=np.uint16))
    add("empty npz", tmp_path / "empty.npz", r"empty")
    np.save(tmp_path / "3d.npy", np.zeros((2, 2, 2), dtype=np.uint16))
    add("3d", tmp_path / "3d.npy", r"shape \(2, 2, 2\)")
    (tmp_path / "garbage.npy").write_bytes(b"\x00garbage bytes, not numpy" * 10)
    add("garbage npy", tmp_path / "garbage.npy", r"not a \.npy file")
    (tmp_path / "garbage.npz").write_bytes(b"PK garbage bytes" * 10)
    add("garbage npz", tmp_path / "garbage.npz", r"cannot read token shard \(BadZipFile")
    np.save(tmp_path / "truncated.npy", _tokens(1000))
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "truncated.npy").read_bytes()[:300])
    add("truncated npy", tmp_path / "truncated.npy", r"cannot read token shard")
    np.savez(tmp_path / "nokey.npz", tokens=_tokens(10), mask=_tokens(10))
    add("npz missing input_ids", tmp_path / "nokey.npz",
        r"no 'input_ids' array .*keys present: \['mask', 'tokens'\]")
    return cases


def test_bad_shards_raise_one_line_error_naming_the_file(tmp_path: Path) -> None:
    for name, (path, pattern) in _bad_shards(tmp_path).items():
        with pytest.raises(DataError, match=pattern) as err:
            open_shard(path)
        message = str(err.value)
        assert str(path) in message, name
        assert "\n" not in message, name
        with pytest.raises(DataError, match=pattern):
            validate_shards([path], vocab_size=50304)


def test_validate_shards_token_id_out_of_range(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", _tokens(100))
    bad = np.zeros(100, dtype=np.uint32)
    bad[42] = 70_000
    np.save(tmp_path / "bad.npy", bad)
    paths = [tmp_path / "ok.npy", tmp_path / "bad.npy"]
    with pytest.raises(DataError) as err:
        validate_shards(paths, vocab_size=50304)
    message = str(err.value)
    assert str(tmp_path / "bad.npy") in message
    assert "token id 70000 >= vocab size 50304" in message
    assert "valid ids are 0..50303" in message
    assert "position 42" in message


def test_validate_shards_scans_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked max (there so a shard larger than RAM is never loaded whole) finds ids in any
    chunk."""
    monkeypatch.setattr(data, "_MAX_CHUNK_TOKENS", 7)
    tokens = _tokens(100, "uint32")
    np.save(tmp_path / "ok.npy", tokens)
    validate_shards([tmp_path / "ok.npy"], vocab_size=100)
    # in the last chunk
    with pytest.raises(DataError, match="token id 99 >= vocab size 99 at position 99"):
        validate_shards([tmp_path / "ok.npy"], vocab_size=99)
    tokens[93] = 500
    np.save(tmp_path / "bad.npy", tokens)
    with pytest.raises(DataError, match="token id 500 >= vocab size 100 at position 93"):
        validate_shards([tmp_path / "bad.npy"], vocab_size=100)


def test_validate_shards_returns_the_opened_shards(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _tokens(100))
    np.savez(tmp_path / "b.npz", input_ids=np.array([1, 2, 999, 3], dtype=np.uint32))
    arrays = validate_shards(discover_shards(tmp_path), vocab_size=1000)
    assert [(a.size, a.dtype.name) for a in arrays] == [(100, "uint16"), (4, "uint32")]
    assert isinstance(arrays[0], np.memmap) and arrays[1].tolist() == [1, 2, 999, 3]


# --- meta.json ------------------------------------------------------------------------------------


def test_read_meta(tmp_path: Path) -> None:
    assert read_meta(tmp_path) is None
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 512, "eos_token_id": 0}))
    assert read_meta(tmp_path) == {"vocab_size": 512, "eos_token_id": 0}
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": "big"}))
    with pytest.raises(DataError, match="vocab_size is 'big'"):
        read_meta(tmp_path)


# --- windows and split ----------------------------------------------------------------------------


def test_packed_windows_span_shard_boundaries() -> None:
    arrays = [_tokens(10, "uint16", 0), _tokens(3, "uint32", 100), _tokens(25, "uint16", 200)]
    flat = np.concatenate([a.astype(np.int64) for a in arrays])
    seq_len = 4
    windows = PackedWindows(arrays, seq_len)
    assert windows.num_tokens == 38
    assert len(windows) == (38 - 1) // seq_len == 9
    for i in range(len(windows)):
        window = windows[i]
        assert window.dtype == np.int64 and window.shape == (seq_len + 1,)
        np.testing.assert_array_equal(window, flat[i * seq_len:i * seq_len + seq_len + 1])
    np.testing.assert_array_equal(windows[-1], windows[len(windows) - 1])
    with pytest.raises(IndexError):
        windows[len(windows)]
    batch = windows.batch([8, 2, 2])
    assert batch.shape == (3, seq_len + 1) and batch.dtype == np.int64
    np.testing.assert_array_equal(batch[0], flat[32:37])
    np.testing.assert_array_equal(batch[1], batch[2])
    # the last window ends exactly at the last token when (tokens - 1) is a multiple of seq_len
    exact = PackedWindows([_tokens(9)], 4)
    assert len(exact) == 2
    np.testing.assert_array_equal(exact[1], np.arange(4, 9))


def test_packed_windows_too_little_data() -> None:
    with pytest.raises(DataError,
                       match=r"data has 8 tokens, fewer than one window of seq_len\+1 = 9"):
        PackedWindows([_tokens(5), _tokens(3)], 8)


@pytest.mark.parametrize(
    ("n", "fraction", "n_train", "n_val"),
    [
        (100, 0.01, 99, 1),
        (100, 0.07, 93, 7),
        (100, 0.0, 100, 0),
        (1000, 0.005, 995, 5),
        (10, 0.001, 9, 1),  # at least one val window
        (2, 0.5, 1, 1),
        (3, 0.9, 1, 2),  # never all: at least one train window
        (1, 0.5, 1, 0),  # a single window goes to training
    ],
)
def test_split_windows(n: int, fraction: float, n_train: int, n_val: int) -> None:
    split = split_windows(n, fraction)
    assert (len(split.train), len(split.val)) == (n_train, n_val)
    assert split.train == range(0, n_train)
    assert split.val == range(n_train, n)


def test_split_windows_errors() -> None:
    with pytest.raises(DataError):
        split_windows(0, 0.01)
    with pytest.raises(ValueError, match="val_fraction"):
        split_windows(10, 1.0)


# --- sample stream --------------------------------------------------------------------------------


def _take(stream: SampleStream, steps: int) -> list[int]:
    return [i for _ in range(steps) for i in stream.next_micro_batch()]


def test_stream_seeded_order() -> None:
    indices = range(5, 105)
    a = _take(SampleStream(indices, seed=1, micro_batch=4, dp_rank=0, dp_size=1), 25)
    b = _take(SampleStream(indices, seed=1, micro_batch=4, dp_rank=0, dp_size=1), 25)
    c = _take(SampleStream(indices, seed=2, micro_batch=4, dp_rank=0, dp_size=1), 25)
    assert a == b
    assert a != c
    assert sorted(a) == list(indices) and sorted(c) == list(indices)  # one epoch exactly
    assert a != list(indices)  # actually shuffled


def test_stream_ranks_disjoint_and_union_is_global_order() -> None:
    indices = range(0, 37)  # not a multiple of the global batch: batches straddle epochs
    global_batch, steps = 8, 20
    single = SampleStream(indices, seed=7, micro_batch=global_batch, dp_rank=0, dp_size=1)
    reference = [single.next_micro_batch() for _ in range(steps)]
    for dp_size in (2, 4):
        micro = global_batch // dp_size
        streams = [SampleStream(indices, seed=7, micro_batch=micro, dp_rank=r, dp_size=dp_size)
                   for r in range(dp_size)]
        for step in range(steps):
            per_rank = [s.next_micro_batch() for s in streams]
            assert all(len(part) == micro for part in per_rank)
            assert [i for part in per_rank for i in part] == reference[step]
            assert {s.consumed_samples for s in streams} == {(step + 1) * global_batch}
        # positions are disjoint across ranks; indices repeat only after an epoch boundary
        first_epoch = [i for s in [SampleStream(indices, seed=7, micro_batch=micro, dp_rank=r,
                                                dp_size=dp_size)
                                   for r in range(dp_size)] for i in s.next_micro_batch()]
        assert len(set(first_epoch)) == len(first_epoch)


def test_stream_resume_matches_continuous_run() -> None:
    indices = range(0, 50)
    for consumed in (0, 12, 48, 54, 102):
        continuous = SampleStream(indices, seed=3, micro_batch=3, dp_rank=1, dp_size=2)
        while continuous.consumed_samples < consumed:
            continuous.next_micro_batch()
        assert continuous.consumed_samples == consumed  # multiples of the global batch 6
        resumed = SampleStream(indices, seed=3, micro_batch=3, dp_rank=1, dp_size=2,
                               consumed_samples=consumed)
        assert resumed.epoch == continuous.epoch == consumed // 50
        assert _take(resumed, 30) == _take(continuous, 30)


def test_stream_resume_with_different_dp_size() -> None:
    """A run saved at 2 ranks resumes at 4 ranks on exactly the positions a 1-rank run would visit
    next."""
    indices = range(0, 40)
    saved = SampleStream(indices, seed=5, micro_batch=4, dp_rank=0, dp_size=2)
    for _ in range(3):
        saved.next_micro_batch()
    single = SampleStream(indices, seed=5, micro_batch=8, dp_rank=0, dp_size=1,
                          consumed_samples=saved.consumed_samples)
    ranks = [SampleStream(indices, seed=5, micro_batch=2, dp_rank=r, dp_size=4,
                          consumed_samples=saved.consumed_samples)
             for r in range(4)]
    for _ in range(10):
        assert [i for s in ranks for i in s.next_micro_batch()] == single.next_micro_batch()


def test_stream_epoch_rollover_covers_every_index_once() -> None:
    indices = range(100, 123)  # 23 windows, micro 5 x 2 ranks: epochs end mid-batch
    streams = [
        SampleStream(indices, seed=11, micro_batch=5, dp_rank=r, dp_size=2) for r in range(2)]
    order: list[int] = []
    epochs_seen = []
    while len(order) < 3 * 23:
        epochs_seen.append(streams[0].epoch)
        for s in streams:
            order.extend(s.next_micro_batch())
    epochs = [order[e * 23:(e + 1) * 23] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(indices)
    assert epochs[0] != epochs[1]  # each epoch has its own permutation
    assert epochs_seen[:4] == [0, 0, 0, 1]


def test_stream_argument_checks() -> None:
    with pytest.raises(ValueError, match="dp_rank"):
        SampleStream(range(10), seed=0, micro_batch=1, dp_rank=2, dp_size=2)
    with pytest.raises(DataError):
        SampleStream(range(0), seed=0, micro_batch=1, dp_rank=0, dp_size=1)


# --- eval batches ---------------------------------------------------------------------------------


def test_eval_batches_rank_disjoint_and_fixed() -> None:
    val = range(900, 950)  # 50 windows
    per_rank = [
        eval_batches(val, micro_batch=3, dp_rank=r, dp_size=4, max_batches=10) for r in range(4)]
    # 50 // 12 full global batches, remainder dropped
    assert all(len(batches) == 4 for batches in per_rank)
    assert all(len(b) == 3 for batches in per_rank for b in batches)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(set(flat)) == len(flat) == 48
    assert sorted(flat) == list(range(900, 948))
    assert per_rank[1][0] == [903, 904, 905]  # same interleaving as SampleStream
    assert eval_batches(val, micro_batch=3, dp_rank=1, dp_size=4, max_batches=10) == per_rank[1]
    assert len(eval_batches(val, micro_batch=3, dp_rank=0, dp_size=4, max_batches=2)) == 2
    assert eval_batches(val, micro_batch=3, dp_rank=0, dp_size=4, max_batches=0) == []


def test_eval_batches_small_val() -> None:
    val = range(20, 25)  # 5 windows, fewer than one global batch of 4 x 2
    per_rank = [
        eval_batches(val, micro_batch=2, dp_rank=r, dp_size=4, max_batches=5) for r in range(4)]
    assert per_rank == [[[20, 21]], [[22, 23]], [[24]], []]
    assert eval_batches(range(0), micro_batch=2, dp_rank=0, dp_size=1, max_batches=5) == []


def test_validation_cache_skips_unchanged_shards_and_still_checks_vocab(tmp_path):
    from neox_train.data.shards import validate_shards

    shard = tmp_path / "a.npy"
    np.save(shard, np.arange(100, dtype=np.uint16))
    cache = tmp_path / ".neox-validated.json"
    first = validate_shards([shard], 200, cache_path=cache)
    assert first[0].size == 100 and list(json.loads(cache.read_text()).values()) == [99]
    # A cached max is trusted only for the same size and mtime: poison it and see it used, then
    # invalidated.
    entry = json.loads(cache.read_text())
    cache.write_text(json.dumps({k: 7 for k in entry}))
    # the poisoned max (7) is below 50: passes without a rescan
    validate_shards([shard], 50, cache_path=cache)
    with pytest.raises(DataError, match="token id 50 >= vocab size 50 at position 50"):
        validate_shards([shard], 50)
    np.save(shard, np.arange(300, dtype=np.uint16))
    with pytest.raises(DataError, match="token id 200 >= vocab size 200 at position 200"):
        validate_shards([shard], 200, cache_path=cache)


def test_batch_gathers_the_same_windows_as_indexing(tmp_path: Path) -> None:
    """batch() takes a fast path for windows inside one shard; windows straddling a boundary (and
    negative indices) must come out exactly as window-by-window indexing gives them, into a caller's
    buffer too."""
    paths = []
    # a 4-token shard: windows span 3 shards
    for i, (a, b) in enumerate([(0, 101), (101, 105), (105, 400)]):
        paths.append(tmp_path / f"s{i}.npy")
        np.save(paths[-1], _tokens(b - a, start=a))
    w = PackedWindows([open_shard(p) for p in paths], seq_len=10)
    indices = list(range(len(w))) + [-1, -len(w), 9, 9]
    expected = np.stack([w[i] for i in indices])
    np.testing.assert_array_equal(w.batch(indices), expected)
    out = np.full((len(indices), 11), -1, dtype=np.int64)
    assert w.batch(indices, out=out) is out
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="out must be int64 of shape"):
        w.batch([0, 1], out=np.empty((2, 10), dtype=np.int64))
    with pytest.raises(IndexError, match=f"window {len(w)} out of range for {len(w)} windows"):
        w.batch([0, len(w)])
    assert w.batch([]).shape == (0, 11)


def test_load_data_opens_every_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed .npz is decompressed on open: validating and then packing must not open (and
    inflate) it twice."""
    import neox_train.data.shards as shards
    from neox_train.config import from_dict
    from neox_train.train import plan as plan_mod

    np.save(tmp_path / "a.npy", _tokens(200))
    np.savez_compressed(tmp_path / "b.npz", input_ids=_tokens(300))
    opened: list[Path] = []
    real = shards.open_shard
    monkeypatch.setattr(shards, "open_shard", lambda p: opened.append(Path(p)) or real(p))
    monkeypatch.setattr(plan_mod, "open_shard", shards.open_shard, raising=False)
    run = from_dict({"model": "neox-tiny", "seq_len": 16, "vocab_size": 1000,
                     "data_dir": str(tmp_path), "ds_config": "zero0", "mixed_precision": "no"})
    plan = plan_mod.prepare_run(run, dp_size=1, on_gpu=False)
    windows, _ = plan_mod.load_data(plan)
    assert sorted(opened) == [tmp_path / "a.npy", tmp_path / "b.npz"]
    assert windows.num_tokens == 500
