"""Token shards on disk: found, opened as memory maps, validated, and described by the prepared
meta.json.

Shards are `.npy` / `.npz` files of uint16/uint32 token ids (what `neox-data prepare` writes), or
gpt-neox/Megatron indexed datasets (PREFIX.bin + PREFIX.idx, data.indexed; a shard is then the
.bin), opened as memory maps so a multi-gigabyte dataset costs page cache, not process memory. They
are read in sorted path order (data.windows cuts them into training windows). There are no document
boundaries to respect: documents are separated by the end-of-text token written by prepare, as in
GPT-NeoX.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from neox_train.data import indexed
from neox_train.errors import DataError, one_line, read_json_object
from neox_train.log import log
from neox_train.model import GPT2_VOCAB_SIZE

SHARD_SUFFIXES = (".npy", ".npz")
VALID_DTYPES = ("uint16", "uint32")
NPZ_KEY = "input_ids"
# What `neox-data prepare` writes next to the shards: its summary (written last: present means
# prepare finished), and the tokenizer; and the end-of-text tokens it recognises in a tokenizer.
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")

# Tokens scanned at once when computing a shard's max id: one buffer of this many tokens (32-64 MB)
# however large the shard is.
_MAX_CHUNK_TOKENS = 16 * 1024 * 1024
# Below these sizes validation takes about a second, so a progress bar would only be noise.
_PROGRESS_MIN_SHARDS = 20
_PROGRESS_MIN_TOKENS = 100_000_000
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30-byte local file header of a zip member
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


def discover_shards(data_dir: str | Path) -> list[Path]:
    """Every .npy/.npz and indexed dataset (its .bin) under data_dir, nested folders included,
    sorted by relative path; or the one indexed dataset data_dir names (PREFIX, PREFIX.bin or
    PREFIX.idx).

    Sorting by the relative path string (not by filesystem order) makes the token order, and so the
    windows, identical on every machine and every rank.
    """
    root = Path(data_dir)
    prefix = indexed.prefix_of(root)
    if prefix is not None:
        # An indexed PREFIX wins over a folder of the same name (Megatron-Core keeps its index
        # caches in PREFIX/cache/).
        return [indexed.bin_path(prefix)]
    if not root.is_dir():
        raise DataError(
            f"data dir {root} does not exist or is not a directory (expected a folder of .npy/.npz "
            "shards or PREFIX.bin/.idx pairs, or the PREFIX of one; make one with: neox-data "
            f"prepare --input TEXT_OR_JSONL... --output {root})"
        )
    # Hidden folders are never data: `.prepare-staging/` left by a killed prepare must not be
    # trained on. Megatron-Core's index caches (PREFIX/cache/GPTDataset_indices/*.npy) are not data
    # either.
    found = [p for p in root.rglob("*")
             if p.suffix.lower() in (*SHARD_SUFFIXES, ".bin", ".idx") and p.is_file()
             and not any(part.startswith(".") or part == "cache"
                         for part in p.relative_to(root).parts[:-1])
             and not p.name.startswith(".")]
    shards = []
    for p in found:
        if p.suffix in (".bin", ".idx"):
            prefix = indexed.strip(p)
            other = indexed.idx_path(prefix) if p.suffix == ".bin" else indexed.bin_path(prefix)
            if not other.is_file():
                # A lone .bin is someone else's file (pytorch_model.bin, ...): said once, not
                # trained on.
                log.warning("%s has no %s beside it: skipped (an indexed dataset is a PREFIX.bin + "
                            "PREFIX.idx pair)", p, other.name)
                continue
            if p.suffix == ".idx":
                continue
        shards.append(p)
    if not shards:
        raise DataError(f"no token shards (.npy/.npz, or .bin/.idx pairs) found under {root}")
    return sorted(shards, key=lambda p: p.relative_to(root).as_posix())


def open_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a 1-D uint16/uint32 array, memory-mapped whenever the file layout
    allows it.

    `.npy` files are always memory-mapped. In a `.npz` the array must be stored under the key
    "input_ids"; it is memory-mapped when that member is stored uncompressed (`np.savez`) and read
    into memory when it is compressed (`np.savez_compressed`), since a deflated stream cannot be
    addressed by offset. A 2-D array (rows of tokens) is flattened row-major, i.e. its rows are
    concatenated in order; a C-ordered array stays a memory map, a Fortran-ordered one is copied.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return indexed.open_indexed(indexed.strip(path)).tokens
    if suffix not in SHARD_SUFFIXES:
        valid = ", ".join(SHARD_SUFFIXES)
        raise DataError(
            f"{path}: not a token shard (suffix {suffix or '(none)'!r}; valid: {valid})")
    try:
        array = _open_npy(path) if suffix == ".npy" else _open_npz(path)
    except DataError:
        raise
    # numpy and zipfile raise many types for a damaged file; all mean "unreadable"
    except Exception as err:
        raise DataError(f"{path}: cannot read token shard ({one_line(err)})") from err
    return _checked_tokens(path, array)


def _open_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    if magic != np.lib.format.MAGIC_PREFIX:
        raise DataError(
            f"{path}: not a .npy file (no NumPy magic header); write shards with np.save")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _open_npz(path: Path) -> np.ndarray:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        member = (f"{NPZ_KEY}.npy" if f"{NPZ_KEY}.npy" in names
                  else NPZ_KEY if NPZ_KEY in names else None)
        if member is None:
            keys = sorted(n.removesuffix(".npy") for n in names)
            raise DataError(
                f"{path}: no {NPZ_KEY!r} array in the .npz (keys present: {keys}); "
                f"save it as np.savez(file, {NPZ_KEY}=tokens)"
            )
        info = archive.getinfo(member)
        encrypted = info.flag_bits & 0x1
        if info.compress_type == zipfile.ZIP_STORED and not encrypted:
            mapped = _memmap_stored_member(path, info)
            if mapped is not None:
                return mapped
        with archive.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


def _memmap_stored_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """Memory-map an uncompressed .npy member of a zip in place; None if its header version is not
    1.0/2.0."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        raw = f.read(_ZIP_LOCAL_HEADER.size)
        if len(raw) != _ZIP_LOCAL_HEADER.size or raw[:4] != _ZIP_LOCAL_MAGIC:
            raise DataError(f"{path}: corrupt .npz (bad local header for member {info.filename!r})")
        *_, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(raw)
        # The local header's extra field can differ from the central directory's, so it is the one
        # to trust.
        member_start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
        f.seek(member_start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        data_offset = f.tell()
    _check_dtype(path, dtype)
    count = math.prod(shape)
    if data_offset - member_start + count * dtype.itemsize > info.file_size:
        raise DataError(f"{path}: corrupt .npz (member {info.filename!r} is shorter than its "
                        f"header's shape {shape})")
    if count == 0:
        # mmap cannot map zero bytes; the emptiness check reports it
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape,
                     order="F" if fortran_order else "C")


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    if dtype.name not in VALID_DTYPES:
        raise DataError(f"{path}: token dtype is {dtype.name}; valid: {', '.join(VALID_DTYPES)}")


def _checked_tokens(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim not in (1, 2):
        raise DataError(
            f"{path}: token array has shape {array.shape}; valid: 1-D tokens or 2-D rows of tokens")
    _check_dtype(path, array.dtype)
    if array.size == 0:
        raise DataError(
            f"{path}: token array is empty (shape {array.shape}); a shard needs at least one token")
    return array.reshape(-1) if array.ndim == 2 else array


VALIDATION_CACHE = ".neox-validated.json"


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_validation_cache(cache_path: Path | None) -> dict[str, int]:
    if cache_path is None or not cache_path.is_file():
        return {}
    try:
        data = json.loads(cache_path.read_text())
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a rescan


def _save_validation_cache(cache_path: Path | None, cache: dict[str, int]) -> None:
    if cache_path is None:
        return
    tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache))
        # several ranks may write the same content; each write is atomic
        os.replace(tmp, cache_path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only dataset folder: validate again next time


def validate_shards(paths: list[Path], vocab_size: int, *,
                    cache_path: Path | None = None) -> list[np.ndarray]:
    """Open every shard and check it before training starts, so a bad file fails in seconds, not
    hours in. Returns the opened shards (memory maps), which the windows are then cut from: each
    file is opened (and a compressed .npz inflated) once.

    An out-of-range id would otherwise surface as a CUDA device-side assert in the embedding lookup,
    with no hint of which file holds it. The max id of each shard is cached in `cache_path` by
    (path, size, mtime), so a restart (and every rank of a node) rescans only shards that changed
    instead of the whole dataset.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    arrays = [open_shard(Path(p)) for p in paths]
    cache = _load_validation_cache(cache_path)
    keys = [_cache_key(Path(p)) for p in paths]
    total = sum(a.size for a, k in zip(arrays, keys) if k not in cache)
    show = len(arrays) > _PROGRESS_MIN_SHARDS or total > _PROGRESS_MIN_TOKENS
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="validate shards", file=sys.stderr,
               disable=not show)
    with bar:
        for path, array, key in zip(paths, arrays, keys):
            max_token = cache.get(key)
            if max_token is None:
                max_token = min_token = 0
                for chunk in _chunks(array):
                    max_token = max(max_token, int(chunk.max()))
                    if array.dtype.kind == "i":  # the signed dtypes of indexed datasets
                        min_token = min(min_token, int(chunk.min()))
                    bar.update(chunk.size)
                if min_token < 0:
                    at = int(np.flatnonzero(array < 0)[0])
                    raise DataError(f"shard {path}: negative token id {int(array[at])} at position "
                                    f"{at} (valid ids are 0..{vocab_size - 1})")
                cache[key] = max_token
            if max_token >= vocab_size:
                at = _first_at_least(array, vocab_size)
                raise DataError(
                    f"shard {path}: token id {int(array[at])} >= vocab size {vocab_size} at "
                    f"position {at} (valid ids are 0..{vocab_size - 1})"
                )
    _save_validation_cache(cache_path, cache)
    return arrays


def _chunks(array: np.ndarray):
    """The array in chunks of _MAX_CHUNK_TOKENS. A memory-mapped file is read through one reusable
    buffer instead of through the map: scanning a 4 GB dataset then costs one buffer of memory, not
    4 GB of resident pages."""
    mapped = (array if isinstance(array, np.memmap)
              else array.base if isinstance(array.base, np.memmap) else None)
    if mapped is None or not getattr(mapped, "filename", None) or array.size != mapped.size:
        for start in range(0, array.size, _MAX_CHUNK_TOKENS):
            yield array[start:start + _MAX_CHUNK_TOKENS]
        return
    buffer = np.empty(min(array.size, _MAX_CHUNK_TOKENS), dtype=array.dtype)
    with open(mapped.filename, "rb", buffering=0) as f:
        f.seek(mapped.offset)
        left = array.size
        while left:
            view = buffer[:min(left, buffer.size)]
            raw, filled = memoryview(view).cast("B"), 0
            # a read may return less (FUSE mounts do): read on until full or the end
            while filled < raw.nbytes:
                got = f.readinto(raw[filled:])
                if not got:
                    raise DataError(
                        f"{mapped.filename}: shorter than its header says ({left} tokens missing)")
                filled += got
            yield view
            left -= view.size


def max_token_ids(paths: list[Path], cache_path: Path | None) -> list[int | None]:
    """Each shard's largest token id as the validation cache holds it (validate_shards fills it)."""
    cache = _load_validation_cache(cache_path)
    return [cache.get(_cache_key(Path(p))) for p in paths]


def _first_at_least(array: np.ndarray, bound: int) -> int:
    for start in range(0, array.size, _MAX_CHUNK_TOKENS):
        hits = np.flatnonzero(array[start:start + _MAX_CHUNK_TOKENS] >= bound)
        if hits.size:
            return start + int(hits[0])
    raise AssertionError("no token at or above the bound")


def dataset_folder(data_path: str | Path) -> Path:
    """The folder that holds a dataset's meta.json and tokenizer.json however the dataset is named:
    the folder itself, or the one beside an indexed PREFIX, PREFIX.bin or PREFIX.idx (a PREFIX wins
    over a folder of its name, as in discover_shards). Every reader of a dataset's side files finds
    them here, so no naming skips a check."""
    prefix = indexed.prefix_of(Path(data_path))
    return prefix.parent if prefix is not None else Path(data_path)


def resolve_vocab(vocab_size: int | None,
                  data_path: str | Path) -> tuple[int, dict[str, Any] | None]:
    """The tokenizer's vocabulary (before padding) and the data's meta.json: the run's vocab_size,
    else meta.json's, else GPT-2's 50257. neox-train and neox-launch's planner resolve it here
    alike, for any naming of the data."""
    meta = read_meta(data_path)
    if vocab_size:
        return vocab_size, meta
    return (int(meta["vocab_size"]) if meta and "vocab_size" in meta else GPT2_VOCAB_SIZE), meta


def read_meta(data_path: str | Path) -> dict[str, Any] | None:
    """The meta.json `neox-data prepare` wrote for the dataset at data_path (a folder, or an indexed
    PREFIX, PREFIX.bin or PREFIX.idx: see dataset_folder), or None when there is none.

    Keys: vocab_size, tokenizer, eos_token_id, num_tokens, num_documents, dtype, shards, inputs.
    Only vocab_size and eos_token_id are checked here, because they are the ones training depends
    on.
    """
    folder = dataset_folder(data_path)
    if not folder.is_dir():
        return None  # no such dataset: discover_shards says so, in one line naming the path
    path = folder / META_FILE
    meta = read_json_object(path, what="the meta.json `neox-data prepare` writes; re-run it, or "
                                       "delete the file",
                            error=DataError, missing_ok=True)
    if meta is None:
        return None
    for key in ("vocab_size", "eos_token_id"):
        value = meta.get(key)
        if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DataError(f"{path}: {key} is {value!r}; valid: a non-negative integer")
    return meta
