"""gpt-neox / Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`), read in place and written.

The `.idx` file (all little-endian):

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
    uint64    sequence count n
    uint64    document count m (the length of doc_idx: documents + 1)
    int32     sizes[n]      tokens per sequence
    int64     pointers[n]   byte offset of each sequence in .bin
    int64     doc_idx[m]    sequence index where each document starts (0 first, n last)

and `.bin` holds the tokens of every sequence back to back. Codes 6 and 7 mean float64/float32 to
Megatron-Core and float32/float64 to gpt-neox; token ids are integers anyway, so both are refused.
Both files are memory-mapped and checked by their sizes and the first and last pointers, never read
whole. The training stream is the tokens of `.bin` in order, cut into windows like our own shards
(whether documents end with an end-of-text token is decided when the data is made: gpt-neox's
`--append-eod`; `neox-data prepare --format indexed` always does).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neox_train.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
DTYPES: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
                               4: np.dtype(np.int32), 5: np.dtype(np.int64), 8: np.dtype(np.uint16)}
CODES = {dtype: code for code, dtype in DTYPES.items()}
AMBIGUOUS_CODES = {6: "float64 to Megatron-Core, float32 to gpt-neox",
                   7: "float32 to Megatron-Core, float64 to gpt-neox"}
VALID_CODES = ", ".join(f"{c} {d.name}" for c, d in DTYPES.items())


@dataclass(frozen=True)
class IndexedDataset:
    prefix: Path
    dtype: np.dtype
    sizes: np.ndarray  # int32[n], memory-mapped
    pointers: np.ndarray  # int64[n]
    doc_idx: np.ndarray  # int64[m]
    tokens: np.ndarray  # the .bin as a 1-D array of dtype, memory-mapped

    @property
    def documents(self) -> int:
        return max(int(self.doc_idx.size) - 1, 0)


def bin_path(prefix: Path) -> Path:
    """PREFIX.bin. (Not with_suffix: a prefix may hold dots of its own, `c4.en_text_document`.)"""
    return Path(f"{prefix}.bin")


def idx_path(prefix: Path) -> Path:
    return Path(f"{prefix}.idx")


def strip(path: Path) -> Path:
    """PREFIX of PREFIX.bin / PREFIX.idx (only that ending is removed)."""
    text = str(path)
    return Path(text[:-4]) if text.endswith((".bin", ".idx")) else Path(path)


def prefix_of(path: Path) -> Path | None:
    """PREFIX for `PREFIX`, `PREFIX.bin` or `PREFIX.idx` when both files exist; else None."""
    base = strip(Path(path))
    return base if bin_path(base).is_file() and idx_path(base).is_file() else None


def open_indexed(prefix: Path) -> IndexedDataset:
    """Read and check PREFIX.idx, memory-map PREFIX.bin; DataError (one line naming the file) when
    anything is off."""
    prefix = Path(prefix)
    idx, bin_file = idx_path(prefix), bin_path(prefix)
    try:
        idx_size, bin_size = idx.stat().st_size, bin_file.stat().st_size
        with open(idx, "rb") as f:
            raw = f.read(_HEADER.size)
    except OSError as e:
        raise DataError(f"{prefix}: cannot read the indexed dataset ({e.strerror or e})") from None
    if len(raw) < _HEADER.size or raw[:len(MAGIC)] != MAGIC:
        raise DataError(f"{idx}: not a gpt-neox/Megatron index (it must start with the magic "
                        f"{MAGIC!r}, found {raw[:len(MAGIC)]!r})")
    _, version, code, n, m = _HEADER.unpack(raw)
    if version != VERSION:
        raise DataError(f"{idx}: index version {version}; valid: {VERSION}")
    if code in AMBIGUOUS_CODES:
        raise DataError(f"{idx}: dtype code {code} is ambiguous ({AMBIGUOUS_CODES[code]}) and not "
                        f"an integer type; valid token dtype codes: {VALID_CODES}")
    if code not in DTYPES:
        raise DataError(f"{idx}: unknown dtype code {code}; valid: {VALID_CODES}")
    dtype = DTYPES[code]
    expected = _HEADER.size + 4 * n + 8 * n + 8 * m
    if idx_size != expected:
        raise DataError(f"{idx}: {idx_size} bytes, but its header's {n} sequences and {m} document "
                        f"entries need {expected} (a truncated or multimodal index)")
    if bin_size % dtype.itemsize:
        raise DataError(
            f"{bin_file}: {bin_size} bytes is not a whole number of {dtype.name} tokens")
    sizes = _map(idx, np.int32, _HEADER.size, n)
    pointers = _map(idx, np.int64, _HEADER.size + 4 * n, n)
    doc_idx = _map(idx, np.int64, _HEADER.size + 12 * n, m)
    if n:
        end = int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize
        if int(pointers[0]) != 0 or end != bin_size or int(sizes[-1]) < 0:
            raise DataError(f"{idx}: its pointers cover bytes {int(pointers[0])}..{end} of "
                            f"{bin_file}, which holds {bin_size} bytes (valid: sequences back to "
                            f"back from byte 0 to the end; was .bin replaced or truncated?)")
    if m and (int(doc_idx[0]) != 0 or int(doc_idx[-1]) != n):
        raise DataError(
            f"{idx}: document index runs {int(doc_idx[0])}..{int(doc_idx[-1])}; valid: 0..{n}")
    if bin_size == 0:
        raise DataError(f"{bin_file}: the dataset holds no tokens")
    tokens = np.memmap(bin_file, dtype=dtype, mode="r", shape=(bin_size // dtype.itemsize,))
    return IndexedDataset(prefix, dtype, sizes, pointers, doc_idx, tokens)


def _map(path: Path, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedWriter:
    """Writes PREFIX.bin as documents arrive (one sequence per document) and PREFIX.idx at
    close()."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        if np.dtype(dtype) not in CODES:
            raise ValueError(f"dtype {dtype} cannot be written (valid: {VALID_CODES})")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = open(bin_path(self.prefix), "wb")
        self._sizes: list[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self._sizes.append(int(np.asarray(tokens).size))

    def close(self) -> Path:
        self._bin.close()
        return write_index(self.prefix, self.dtype, np.asarray(self._sizes, dtype=np.int32))


def write_index(prefix: Path, dtype: np.dtype, sizes: np.ndarray) -> Path:
    """PREFIX.idx for the PREFIX.bin that holds these sequences back to back, one document each."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(sizes.size, dtype=np.int64)
    if sizes.size > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(sizes.size + 1, dtype=np.int64)
    with open(idx_path(Path(prefix)), "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODES[dtype], sizes.size, doc_idx.size))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    return Path(prefix)
