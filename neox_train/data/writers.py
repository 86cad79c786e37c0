"""What `neox-data prepare` writes, resumably: our .npy shards, or one gpt-neox/Megatron indexed
dataset.

Both writers work in the prepare's staging folder and can say, at a *checkpoint*, how much of the
token stream is durably on disk. prepare records that in `progress.json` (documents done, tokens of
the next document already written); an interrupted prepare then continues from the newest checkpoint
instead of starting over:
- shards: a checkpoint after every finished shard file (a shard may end inside a document: `carry`
  tokens of the next document are already in it);
- indexed: `data.bin` and the sequence sizes (`data.sizes`, raw int32) are append-only; a checkpoint
  fsyncs both at a document boundary, and a resume truncates them back to it. The `.idx` is written
  at the end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from neox_train.data.indexed import bin_path, write_index

SHARD_PATTERN = re.compile(r"shard_\d{5,}\.npy")
INDEXED_PREFIX = "data"  # the indexed dataset is OUTPUT/data.bin + OUTPUT/data.idx


class ShardWriter:
    """Cuts the token stream into shard files of exactly shard_tokens tokens (the last one
    shorter)."""

    def __init__(self, folder: Path, shard_tokens: int, dtype: np.dtype, state: dict | None = None):
        self.folder = folder
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.shards: list[str] = list((state or {}).get("shards", []))
        # tokens in finished shard files
        self.durable_tokens = int((state or {}).get("durable_tokens", 0))
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.checkpoint_due = False
        for stale in folder.glob("shard_*.npy"):  # a shard being written when the last run stopped
            if stale.name not in self.shards:
                stale.unlink()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self._pending_tokens)
            self._pending.append(tokens[:take])
            self._pending_tokens += take
            tokens = tokens[take:]
            if self._pending_tokens == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self._pending_tokens:
            return
        name = f"shard_{len(self.shards):05d}.npy"
        with open(self.folder / name, "wb") as f:
            np.save(f, np.concatenate(self._pending).astype(self.dtype, copy=False))
            f.flush()
            os.fsync(f.fileno())
        self.shards.append(name)
        self.durable_tokens += self._pending_tokens
        self._pending, self._pending_tokens = [], 0
        self.checkpoint_due = True

    def state(self) -> dict:
        self.checkpoint_due = False
        return {"shards": list(self.shards), "durable_tokens": self.durable_tokens}

    def finish(self) -> list[str]:
        self.flush()
        return list(self.shards)


class ResumableIndexedWriter:
    """One PREFIX.bin/.idx pair; sequence sizes kept in an append-only side file until the end."""

    # about one shard's worth between checkpoints; NEOX_PREPARE_CHECKPOINT_TOKENS
    CHECKPOINT_TOKENS = 50_000_000

    def __init__(self, folder: Path, dtype: np.dtype, state: dict | None = None):
        self.folder = folder
        self.dtype = np.dtype(dtype)
        self.prefix = folder / INDEXED_PREFIX
        self._sizes_path = folder / f"{INDEXED_PREFIX}.sizes"
        self.durable_tokens = int((state or {}).get("durable_tokens", 0))
        documents = int((state or {}).get("documents", 0))
        # Back to the last checkpoint: whatever was appended after it is written again.
        for path, length in ((bin_path(self.prefix), self.durable_tokens * self.dtype.itemsize),
                             (self._sizes_path, documents * 4)):
            with open(path, "ab") as f:
                f.truncate(length)
        self._bin = open(bin_path(self.prefix), "ab")  # noqa: SIM115 - closed in finish()
        self._sizes = open(self._sizes_path, "ab")  # noqa: SIM115
        self.documents = documents
        self._since = 0
        self.checkpoint_due = False

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._sizes.write(lengths.astype(np.int32).tobytes())
        self.documents += int(lengths.size)
        self._since += int(tokens.size)
        self.durable_tokens += int(tokens.size)  # durable once the checkpoint has synced it
        if self._since >= int(os.environ.get("NEOX_PREPARE_CHECKPOINT_TOKENS",
                                             self.CHECKPOINT_TOKENS)):
            self.checkpoint_due = True

    def state(self) -> dict:
        for f in (self._bin, self._sizes):
            f.flush()
            os.fsync(f.fileno())
        self._since = 0
        self.checkpoint_due = False
        return {"durable_tokens": self.durable_tokens, "documents": self.documents,
                "itemsize": self.dtype.itemsize}

    def finish(self) -> list[str]:
        self._bin.close()
        self._sizes.close()
        sizes = np.fromfile(self._sizes_path, dtype=np.int32)
        write_index(self.prefix, self.dtype, sizes)
        self._sizes_path.unlink()
        return [f"{INDEXED_PREFIX}.bin", f"{INDEXED_PREFIX}.idx"]

