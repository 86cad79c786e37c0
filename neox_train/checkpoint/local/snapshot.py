"""A checkpoint's state copied to host buffers that are reused across saves: the only part of an
asynchronous save that blocks the training loop.

DeepSpeed hands the checkpoint engine one state dict per file (weights, optimizer partitions,
scheduler, our client state). `snapshot` copies every tensor into a host buffer from a
`SnapshotPool`. On a GPU the buffers are pinned and the copies non-blocking, with one
synchronisation at the end. The pool keeps the buffers between saves: fresh host memory is slow to
touch the first time on these VMs, so only the first save pays for it.

The copy has the layout torch.save would have written from the original, so the files of an
asynchronous save are byte-identical to a synchronous one's:
- `compact=True` for the state dicts DeepSpeed would have cloned itself (the module weights, which
  are views into flat buffers): each tensor gets its own compact copy, exactly like DeepSpeed's
  clone_tensors_for_torch_save.
- `compact=False` for the rest: tensors that share a storage (ZeRO's flat partitions and their
  views) still share one copied storage, so nothing is written twice.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

import psutil
import torch

# Testing aid: pretend this many bytes of host memory are available (the fallback to synchronous
# saves is tested on machines that have plenty). Read only by available_host_memory.
HOST_MEMORY_ENV = "NEOX_TEST_HOST_MEMORY_BYTES"


def available_host_memory() -> int:
    override = os.environ.get(HOST_MEMORY_ENV)
    if override:
        return int(override)
    return int(psutil.virtual_memory().available)


class SnapshotPool:
    """Host buffers by (file name, position in that file's state dict), kept from one save to the
    next."""

    def __init__(self, *, pin: bool):
        self.pin = pin
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.bytes_allocated = 0

    def take(self, key: tuple[str, int], nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of exactly `nbytes` (torch.save writes a storage whole, so the size
        must match)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != nbytes:
            if buf is not None:
                self.bytes_allocated -= buf.numel()
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[key] = buf
            self.bytes_allocated += nbytes
        return buf


class _Copier:
    def __init__(self, pool: SnapshotPool, file_key: str, compact: bool):
        self.pool, self.file_key, self.compact = pool, file_key, compact
        # source storage -> its copy
        self.storages: dict[tuple[str, int], torch.UntypedStorage] = {}
        self.slots = 0
        self.nbytes = 0
        # pickle writes an object referenced twice once: the copy must keep that identity. Storage
        # mode mirrors the original (every object, tensors and containers too); compact mode mirrors
        # DeepSpeed's clone, which makes new containers and tensors per reference but keeps every
        # other object as it is.
        self.memo: dict[int, Any] = {}
        self.leaf_memo: dict[int, Any] = {}

    def _slot(self, nbytes: int) -> torch.Tensor:
        buf = self.pool.take((self.file_key, self.slots), nbytes)
        self.slots += 1
        self.nbytes += nbytes
        return buf

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        requires_grad = t.requires_grad  # torch.save records it: the copy must say the same
        if self.compact:
            if not t.is_contiguous() or t.numel() == 0:
                return t.detach().clone() if t.device.type == "cpu" else t.detach().to("cpu")
            buf = self._slot(t.numel() * t.element_size())
            out = buf.view(t.dtype).view(t.shape)
            out.copy_(t.detach(), non_blocking=True)
            return out
        src = t.untyped_storage()
        if src.nbytes() == 0:
            out = t.detach().clone() if t.device.type == "cpu" else t.detach().to("cpu")
        else:
            key = (str(src.device), src.data_ptr())
            dst = self.storages.get(key)
            if dst is None:
                buf = self._slot(src.nbytes())
                dst = buf.untyped_storage()
                dst.copy_(src, non_blocking=True)
                self.storages[key] = dst
            out = torch.empty(0, dtype=t.dtype)
            out.set_(dst, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=requires_grad)
        elif requires_grad:
            out.requires_grad_(True)
        # Python attributes on a tensor (ZeRO-3 tags its partitions with ds_* fields) are pickled
        # with it.
        state = torch._utils._get_obj_state(t)
        if state:
            torch._utils._set_obj_state(out, self.copy(state))
        return out

    def copy(self, item: Any) -> Any:
        if self.compact:
            return self._copy_compact(item)
        key = id(item)
        if key in self.memo:
            return self.memo[key]
        if torch.is_tensor(item):
            out = self.tensor(item)
        elif type(item) in (dict, OrderedDict):
            out = type(item)((k, self.copy(v)) for k, v in item.items())
        elif type(item) in (list, tuple):
            out = type(item)(self.copy(v) for v in item)
        else:
            # Numbers, strings, torch.Size, configs: a deep copy, so the loop's later changes never
            # reach the file (a tensor hidden inside such an object is copied too, just without a
            # pooled buffer).
            out = copy.deepcopy(item, self.leaf_memo)
        self.memo[key] = out
        return out

    def _copy_compact(self, item: Any) -> Any:
        if torch.is_tensor(item):
            return self.tensor(item)
            # Exactly DeepSpeed's clone_tensors_for_torch_save: dict types kept, every tuple
            # (torch.Size too) becomes a plain tuple, every list a list.
        # Exactly DeepSpeed's clone_tensors_for_torch_save: dict types kept, every tuple (torch.Size
        # too) becomes a plain tuple, every list a list; other objects keep their identity (one deep
        # copy each).
        if isinstance(item, dict):
            return type(item)({k: self._copy_compact(v) for k, v in item.items()})
        if isinstance(item, list):
            return [self._copy_compact(v) for v in item]
        if isinstance(item, tuple):
            return tuple(self._copy_compact(v) for v in item)
        return copy.deepcopy(item, self.leaf_memo)


def snapshot(state: Any, pool: SnapshotPool, *, file_key: str, compact: bool) -> tuple[Any, int]:
    """(a copy of `state` whose tensors live in `pool`'s host buffers, bytes copied). Returns once
    every copy is complete: after it the loop may change the originals."""
    copier = _Copier(pool, file_key, compact)
    out = copier.copy(state)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies into pinned buffers
    return out, copier.nbytes
