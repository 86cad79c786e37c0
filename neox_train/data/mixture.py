"""Weighted mixtures of datasets: `data: [{"path": ..., "weight": ...}, ...]` in the run config.

A weight is the share of training samples drawn from that dataset: with weights 0.7 and 0.3, 7 of
every 10 samples come from the first. (Weights are normalised, so 7 and 3 mean the same.) A dataset
smaller than its share repeats (each pass in a new seeded order); a larger one is not seen whole by
max_steps. The run says at start how many epochs of each it will see.

Which dataset global sample p comes from is fixed by the weights alone, with no randomness: dataset
d's k-th sample sits at time (k + 0.5) / w_d, and samples are taken in time order (ties: the lower
dataset index). So every window of samples holds each dataset within one sample of its share, the
order is the same on every machine, and it does not depend on how far the run goes. Dataset d's k-th
sample is its window perm_{d,e}[k mod n_d] with e = k // n_d and perm_{d,e} = default_rng([seed, d,
e]).permutation(n_d) over its training windows. Sample positions are global and split across ranks
exactly as a single dataset's (data.windows.SampleStream), so a resumed run (at any rank count)
draws the same samples from the same datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neox_train.data.windows import PackedWindows, SampleStream, Split, check_ranks
from neox_train.errors import DataError


@dataclass(frozen=True)
class Part:
    name: str
    path: str
    weight: float  # normalised: the parts' weights sum to 1
    base: int  # its first window in the mixture's index space
    windows: PackedWindows
    train: range  # window indices in the mixture's index space
    val: range


class MixtureWindows:
    """The datasets' windows side by side in one index space (part d's window i is index base_d +
    i)."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.seq_len = parts[0].windows.seq_len
        self._bases = np.array([p.base for p in parts], dtype=np.int64)
        self.num_tokens = sum(p.windows.num_tokens for p in parts)
        self._len = parts[-1].base + len(parts[-1].windows)

    def __len__(self) -> int:
        return self._len

    def batch(self, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        shape = (len(indices), self.seq_len + 1)
        if out is None:
            out = np.empty(shape, dtype=np.int64)
        idx = np.asarray(indices, dtype=np.int64)
        owner = np.searchsorted(self._bases, idx, side="right") - 1
        for d in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == d)
            out[rows] = self.parts[d].windows.batch((idx[rows] - self._bases[d]).tolist())
        return out


@dataclass(frozen=True)
class MixtureSplit:
    parts: list[Part]

    @property
    def val(self) -> range:
        """Every part's validation windows (for "is there anything to evaluate")."""
        return range(sum(len(p.val) for p in self.parts))


def combine(datasets: Sequence[tuple[str, str, float, PackedWindows,
                                     Split]]) -> tuple[MixtureWindows, MixtureSplit]:
    """(name, path, weight, windows, split) of each dataset -> the mixture: the parts side by side
    in one index space, their weights normalised to sum to 1."""
    total = sum(weight for _, _, weight, _, _ in datasets)
    parts, base = [], 0
    for name, path, weight, windows, split in datasets:
        parts.append(Part(name, path, weight / total, base, windows,
                          range(base + split.train.start, base + split.train.stop),
                          range(base + split.val.start, base + split.val.stop)))
        base += len(windows)
    return MixtureWindows(parts), MixtureSplit(parts)


# the blend is built in slabs of this much time (about that many samples): memory stays flat
SLAB = 1 << 16


class Blend:
    """Which dataset each global sample comes from, and its ordinal there: dataset d's k-th sample
    sits at time (k + 0.5) / w_d, samples in time order (ties: the lower dataset). Built a slab of
    time at a time: dataset d has K_d(t) = ceil(t * w_d - 0.5) samples before time t, so slab s
    (times [s*SLAB, (s+1)*SLAB)) starts at sample sum_d K_d(s*SLAB), and any position is found
    without building what comes before it."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.w = w / w.sum()
        # (slab, start, ids, ordinals)
        self._slab: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def before(self, t: float) -> np.ndarray:
        """Samples of each dataset before time t."""
        return np.maximum(np.ceil(t * self.w - 0.5), 0).astype(np.int64)

    def start(self, slab: int) -> int:
        return int(self.before(slab * SLAB).sum())

    def slab_of(self, position: int) -> int:
        s = position // SLAB
        while s > 0 and self.start(s) > position:
            s -= 1
        while self.start(s + 1) <= position:
            s += 1
        return s

    def slab(self, s: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(its first position, dataset of each sample, ordinal of each sample)."""
        if self._slab is not None and self._slab[0] == s:
            return self._slab[1:]
        lo, hi = self.before(s * SLAB), self.before((s + 1) * SLAB)
        ids = np.concatenate(
            [np.full(h - a, d, dtype=np.int64) for d, (a, h) in enumerate(zip(lo, hi))])
        ordinals = np.concatenate([np.arange(a, h, dtype=np.int64) for a, h in zip(lo, hi)])
        order = np.lexsort((ids, (ordinals + 0.5) / self.w[ids]))
        self._slab = (s, int(lo.sum()), ids[order], ordinals[order])
        return self._slab[1:]

    def take(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(datasets, ordinals) of samples first .. first+count-1."""
        ids, ords = [], []
        s, need = self.slab_of(first), count
        while need:
            start, slab_ids, slab_ords = self.slab(s)
            a = max(first - start, 0)
            b = min(a + need, slab_ids.size)
            ids.append(slab_ids[a:b])
            ords.append(slab_ords[a:b])
            need -= b - a
            s += 1
        return ((np.concatenate(ids), np.concatenate(ords)) if ids
                else (np.empty(0, np.int64), np.empty(0, np.int64)))

    def counts(self, n: int) -> np.ndarray:
        """Samples of each dataset among the first n."""
        s = self.slab_of(n)
        start, ids, _ = self.slab(s)
        return self.before(s * SLAB) + np.bincount(ids[:n - start], minlength=self.w.size)


def blend(weights: Sequence[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """For global samples 0..n-1: (the dataset of each, its ordinal within that dataset)."""
    return Blend(weights).take(0, n)


class MixtureStream:
    """SampleStream's contract (consumed_samples, next_micro_batch) over a mixture."""

    def __init__(self, split: MixtureSplit, *, seed: int, micro_batch: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0):
        check_ranks(micro_batch, dp_rank, dp_size)
        for p in split.parts:
            if not len(p.train):
                raise DataError(f"dataset {p.name} ({p.path}) has no training windows (its data is "
                                f"shorter than two windows, or val_fraction takes them all)")
        self.parts = split.parts
        self.weights = [p.weight for p in split.parts]
        self.seed, self.micro_batch = seed, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._consumed = consumed_samples
        self._blend = Blend(self.weights)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        perm = self._perms.get(key)
        if perm is None:
            for old in [k for k in self._perms if k[0] == d and k[1] < epoch - 1]:
                del self._perms[old]
            perm = np.random.default_rng([self.seed, d, epoch]).permutation(
                len(self.parts[d].train))
            self._perms[key] = perm
        return perm

    def samples(self, first: int, count: int) -> list[int]:
        """Window indices of global samples first .. first+count-1."""
        ids, ordinals = self._blend.take(first, count)
        out = np.empty(count, dtype=np.int64)
        for d in np.unique(ids).tolist():
            rows = np.flatnonzero(ids == d)
            n = len(self.parts[d].train)
            k = ordinals[rows]
            for epoch in np.unique(k // n).tolist():
                sel = rows[(k // n) == epoch]
                out[sel] = self.parts[d].train.start + self._perm(d, epoch)[ordinals[sel] % n]
        return out.tolist()

    def next_micro_batch(self) -> list[int]:
        first = self._consumed + self.dp_rank * self.micro_batch
        self._consumed += self.micro_batch * self.dp_size
        return self.samples(first, self.micro_batch)


def epochs_by(split: MixtureSplit, total_samples: int) -> list[dict]:
    """Each dataset's samples, share and epochs over the first `total_samples` samples (what
    max_steps draws)."""
    counts = Blend([p.weight for p in split.parts]).counts(total_samples)
    return [{"name": p.name, "path": p.path, "weight": p.weight, "train_windows": len(p.train),
             "samples": int(c), "epochs": int(c) / len(p.train) if len(p.train) else float("inf")}
            for p, c in zip(split.parts, counts)]


def epochs_line(rows: list[dict], max_steps: int) -> str:
    return "; ".join(f"{r['name']} (weight {r['weight']:.3g}): {r['samples']:,} samples by "
                     f"max_steps={max_steps} = {r['epochs']:.2f} epochs of its "
                     f"{r['train_windows']:,} windows"
                     + (" (repeats)" if r["epochs"] > 1 else "") for r in rows)


def make_stream(split: Split | MixtureSplit, **kw) -> SampleStream | MixtureStream:
    """The training sample stream of one dataset's split, or of a mixture's."""
    if isinstance(split, MixtureSplit):
        return MixtureStream(split, **kw)
    return SampleStream(split.train, **kw)
