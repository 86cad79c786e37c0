"""The token stream cut into training windows, split into train/validation, and sampled.

Windows are `seq_len + 1` tokens of the concatenated shards that start every `seq_len` tokens
(adjacent windows share one token, so every token is a target exactly once); the last `val_fraction`
of them is held out. The training order is a seeded shuffle per epoch, split across data-parallel
ranks without overlap; the position is the global count of samples consumed, so a resumed run (at
any rank count) sees exactly the data it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neox_train.errors import DataError


class PackedWindows:
    """Fixed-length training windows of seq_len + 1 tokens packed across the concatenation of all
    shards (a window may span a shard boundary), window i starting at global token i * seq_len.
    Inputs are window[:-1], targets window[1:].

    The trailing tokens that do not fill a window are never used; with many shards that is under one
    window in total, not one per shard, which is why windows are packed across boundaries.
    """

    def __init__(self, arrays: list[np.ndarray], seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self._arrays = list(arrays)
        lengths = np.array([a.size for a in self._arrays], dtype=np.int64)
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths
        # For batch(): plain ndarray views of the same mapped memory (slicing an np.memmap runs its
        # __array_finalize__, which costs more than copying a window), and the bounds as Python
        # ints.
        self._plain = [a.view(np.ndarray) if isinstance(a, np.memmap) else a for a in self._arrays]
        self._start_list = self._starts.tolist()
        self._size_list = lengths.tolist()
        self.num_tokens = int(self._ends[-1]) if len(self._ends) else 0
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"data has {self.num_tokens} tokens, fewer than one window of seq_len+1 = "
                f"{seq_len + 1}; add data or lower seq_len"
            )
        self._len = (self.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        width = self.seq_len + 1
        out = np.empty(width, dtype=np.int64)
        pos = i * self.seq_len
        k = int(np.searchsorted(self._ends, pos, side="right"))
        filled = 0
        while filled < width:
            local = pos - int(self._starts[k])
            take = min(self._arrays[k].size - local, width - filled)
            out[filled:filled + take] = self._arrays[k][local:local + take]
            filled += take
            pos += take
            k += 1
        return out

    def batch(self, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Windows `indices` stacked as int64 (len(indices), seq_len + 1); inputs [:, :-1], targets
        [:, 1:].

        `out`, when given, is filled in place (the loader passes a pinned host buffer, so the copy
        to the GPU needs no staging copy). This is the loader's hot path: about 10 us for 8
        windows."""
        shape = (len(indices), self.seq_len + 1)
        if out is None:
            out = np.empty(shape, dtype=np.int64)
        elif out.shape != shape or out.dtype != np.int64:
            raise ValueError(f"out must be int64 of shape {shape}, got {out.dtype} {out.shape}")
        if not len(indices):
            return out
        rows = [int(i) + self._len if int(i) < 0 else int(i) for i in indices]
        for i, row in zip(indices, rows):
            if not 0 <= row < self._len:
                raise IndexError(f"window {i} out of range for {self._len} windows")
        width = self.seq_len + 1
        firsts = [row * self.seq_len for row in rows]
        shards = np.searchsorted(self._ends, firsts, side="right").tolist()
        for r, (first, k) in enumerate(zip(firsts, shards)):
            local = first - self._start_list[k]
            if local + width <= self._size_list[k]:
                out[r] = self._plain[k][local:local + width]
            else:  # straddles a shard boundary
                out[r] = self[rows[r]]
        return out


@dataclass(frozen=True)
class Split:
    train: range  # window indices used for training
    val: range  # held-out window indices


def split_windows(num_windows: int, val_fraction: float) -> Split:
    """Hold out the LAST ceil(val_fraction * n) windows for validation.

    A contiguous tail (rather than a random subset) keeps validation text out of every training
    window except the one window that straddles the cut. val gets at least one window when
    val_fraction > 0 and n >= 2, and never all of them; with a single window, it all goes to
    training and val is empty.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_windows < 1:
        raise DataError(
            f"data has {num_windows} windows; need at least one (add data or lower seq_len)")
    n_val = 0
    if val_fraction > 0:
        # round: 0.07 * 100 must be 7, not 7.000000000000001
        n_val = math.ceil(round(val_fraction * num_windows, 9))
        n_val = min(max(n_val, 1), num_windows - 1)
    n_train = num_windows - n_val
    return Split(train=range(0, n_train), val=range(n_train, num_windows))


def check_ranks(micro_batch: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need dp_size >= 1 and 0 <= dp_rank < dp_size, got dp_rank={dp_rank} "
                         f"dp_size={dp_size}")


class SampleStream:
    """Deterministic, seeded, rank-sharded stream of window indices with a resumable position.

    The position is `consumed_samples`, counted GLOBALLY (all data-parallel ranks together), so it
    stays valid when the number of ranks changes on resume. Epoch e uses permutation
    np.random.default_rng([seed, e]).permutation(n) of the train indices (cache the current epoch's
    permutation). Each call to next_micro_batch() consumes a global micro-batch of micro_batch *
    dp_size consecutive positions p = consumed .. consumed + micro_batch*dp_size - 1 (position p
    maps to epoch p // n and permuted index (p % n)); rank r takes positions [consumed +
    r*micro_batch, consumed + (r+1)*micro_batch); then consumed advances by micro_batch*dp_size. So
    ranks are disjoint within a global micro-batch, and every rank agrees on consumed_samples.

    The stream never ends: epochs roll over mid-micro-batch if needed, and each epoch visits every
    train index exactly once. Resume with SampleStream(..., consumed_samples=saved) and the
    continuation is identical.
    """

    def __init__(
        self,
        indices: range,
        *,
        seed: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ):
        if len(indices) < 1:
            raise DataError("no training windows to sample from (the train split is empty)")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        check_ranks(micro_batch, dp_rank, dp_size)
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.indices = indices
        self.seed = seed
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._consumed = consumed_samples
        self._perms: dict[int, np.ndarray] = {}

    @property
    def consumed_samples(self) -> int:
        """Samples taken by all ranks together; save this in the checkpoint to resume."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """Epoch of the next position (0-based)."""
        return self._consumed // len(self.indices)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            self._perms[epoch] = perm
        return perm

    def next_micro_batch(self) -> list[int]:
        """This rank's micro_batch window indices; advances consumed_samples by micro_batch *
        dp_size."""
        n = len(self.indices)
        first = self._consumed + self.dp_rank * self.micro_batch
        last = first + self.micro_batch - 1
        first_epoch, last_epoch = first // n, last // n
        if first_epoch == last_epoch:  # the common case: one slice of one permutation
            offsets = self._permutation(first_epoch)[first % n:last % n + 1]
        else:
            positions = np.arange(first, last + 1, dtype=np.int64)
            epochs = positions // n
            offsets = np.empty_like(positions)
            for epoch in range(first_epoch, last_epoch + 1):
                mask = epochs == epoch
                offsets[mask] = self._permutation(epoch)[positions[mask] % n]
        # Only the epochs still ahead of this rank are kept, so at most two permutations are ever
        # held.
        for old in [e for e in self._perms if e < first_epoch]:
            del self._perms[old]
        self._consumed += self.micro_batch * self.dp_size
        if isinstance(self.indices, range):
            # range arithmetic in numpy: the same values as [self.indices[j] for j in offsets],
            # without a Python call per sample.
            return (self.indices.start + offsets * self.indices.step).tolist()
        return [self.indices[int(j)] for j in offsets]


def eval_batches(indices: range, *, micro_batch: int, dp_rank: int, dp_size: int,
                 max_batches: int) -> list[list[int]]:
    """Fixed (unshuffled) validation micro-batches for this rank, the same at every evaluation.

    Global micro-batch b covers val windows [b*G, (b+1)*G) with G = micro_batch * dp_size, and rank
    r takes [b*G + r*micro_batch, b*G + (r+1)*micro_batch) of it, as in SampleStream. Up to
    max_batches full global micro-batches are used and an incomplete one at the end is dropped, so
    every rank gets the same number of full batches. Exception: when val holds fewer than G windows,
    that single partial global micro-batch is used, so ranks get what falls in their slice: a short
    batch, or NO batch at all for high ranks. Ranks may then run different numbers of eval steps, so
    reduce loss sums and counts across ranks once after the loop (never per batch), and expect some
    ranks to contribute zero.
    """
    check_ranks(micro_batch, dp_rank, dp_size)
    if max_batches < 0:
        raise ValueError(f"max_batches must be >= 0, got {max_batches}")
    global_batch = micro_batch * dp_size
    n_full = min(max_batches, len(indices) // global_batch)
    if n_full == 0 and max_batches > 0 and len(indices) > 0:
        mine = list(indices[dp_rank * micro_batch:(dp_rank + 1) * micro_batch])
        return [mine] if mine else []
    return [
        list(indices[b * global_batch + dp_rank * micro_batch:
                     b * global_batch + (dp_rank + 1) * micro_batch])
        for b in range(n_full)
    ]
