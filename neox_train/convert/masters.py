"""The fp32 master weights of a ZeRO-1/2/3 checkpoint through DeepSpeed's own `zero_to_fp32`,
without holding the model in memory twice.

For ZeRO-3, zero_to_fp32's `lazy_mode=True` is supported and enough: it hands out GatheredTensors
over the memory-mapped partitions. For ZeRO-1/2 there is no supported lazy path in DeepSpeed 0.19.8:
its merge concatenates every rank's partition into one new buffer first (its own comment: "memory
usage doubles here"). This module is the one place that reaches into DeepSpeed's internals to avoid
that: for the duration of the call it replaces the `torch` that zero_to_fp32's module sees with one
whose `cat` is deferred (_DeferredTorch below), so every offset, padding and shape DeepSpeed
computes is kept while a slice reads its bytes from the mapped partitions only when taken.
tests/test_convert.py pins it: on real ZeRO-1 and ZeRO-2 checkpoints of 2 ranks the result equals
DeepSpeed's eager zero_to_fp32 bit for bit, and every conversion compares each master with the
module's weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    if value is None:
        yield
        return
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class _DeferredTorch:
    """`torch` as zero_to_fp32's ZeRO-1/2 merge sees it, with `cat` deferred.

    That merge concatenates every rank's fp32 partition of a parameter group into one new buffer,
    then hands out narrow().view() slices of it: the whole fp32 model in memory at once, plus the
    mapped file pages it was copied from (its own comment: "memory usage doubles here"). Deferring
    the concatenation keeps every offset, padding and shape DeepSpeed's code computes, but a slice
    only reads its bytes from the mapped partitions when taken. Any misreading would surface at
    once: each master is compared bit for bit with the module's weights."""

    def __init__(self) -> None:
        self.cats: list[_DeferredCat] = []

    def cat(self, tensors, dim=0):
        if dim != 0 or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tensors):
            return torch.cat(tensors, dim)
        deferred = _DeferredCat(list(tensors))
        self.cats.append(deferred)
        return deferred

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _DeferredCat:
    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + p.numel())
        self.dtype = parts[0].dtype

    def numel(self) -> int:
        return self.starts[-1]

    def narrow(self, dim: int, start: int, length: int) -> "_DeferredSlice":
        if dim != 0 or start < 0 or start + length > self.numel():
            raise ValueError(f"narrow({dim}, {start}, {length}) outside a deferred vector of "
                             f"{self.numel()} elements")
        return _DeferredSlice(self, start, length, torch.Size([length]))


class _DeferredSlice:
    def __init__(self, source: _DeferredCat, start: int, length: int, shape: torch.Size):
        self.source, self.start, self.length, self.shape = source, start, length, shape
        self.dtype = source.dtype

    def view(self, *shape) -> "_DeferredSlice":
        size = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if size.numel() != self.length:
            raise ValueError(f"view {tuple(size)} of a deferred slice of {self.length} elements")
        return _DeferredSlice(self.source, self.start, self.length, size)

    def numel(self) -> int:
        return self.length

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def contiguous(self) -> torch.Tensor:
        """Copy the slice out of the partitions it spans (one new tensor; the partitions are not
        touched elsewhere)."""
        src, end, pieces = self.source, self.start + self.length, []
        for part, lo, hi in zip(src.parts, src.starts, src.starts[1:]):
            if hi > self.start and lo < end:
                pieces.append(part[max(self.start, lo) - lo: min(end, hi) - lo])
        return (torch.cat(pieces).view(self.shape) if len(pieces) != 1
                else pieces[0].clone().view(self.shape))


def lazy_fp32_masters(tag_dir: Path, stage: int) -> tuple[dict[str, Any], list[list[torch.Tensor]]]:
    """(name -> lazily gathered fp32 tensor, each rank's memory-mapped fp32 partitions) of
    SAVE_DIR/TAG."""
    # Deferred: deepspeed (~1.7 s at import) loads only when fp32 masters are read; other exports
    # never pay it.
    from deepspeed.utils import zero_to_fp32

    deferred = _DeferredTorch() if stage in (1, 2) else None
    with _patched(zero_to_fp32, "torch", deferred):
        lazy = dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True))
    if deferred is not None:
        per_rank = [list(group) for group in zip(*(cat.parts for cat in deferred.cats))]
    else:
        gathered = next((v for v in lazy.values() if isinstance(v, zero_to_fp32.GatheredTensor)),
                        None)
        per_rank = [list(groups) for groups in gathered.flat_groups] if gathered is not None else []
    return lazy, per_rank
