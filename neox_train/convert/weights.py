"""A checkpoint's weights, one tensor at a time, from DeepSpeed's own formats:

- ZeRO-1/2/3: `deepspeed.utils.zero_to_fp32` in lazy mode (the fp32 master partitions,
  memory-mapped);
- ZeRO-0: `mp_rank_00_model_states.pt["module"]` (zero_to_fp32 refuses stage 0), and the fp32
  masters that DeepSpeed's fp16/bf16 optimizer keeps next to it when the run trained in bf16/fp16.

Where both the module's training-precision weights and fp32 masters exist, each master, rounded to
the module's dtype, must equal the module's tensor bit for bit (DeepSpeed copies the rounded masters
into the module after every step): a cheap proof that the partitions were stitched together under
the right names.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from typing import Any

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neox_train.convert.masters import lazy_fp32_masters
from neox_train.convert.source import CheckpointInfo, stdout_to_stderr, torch_load
from neox_train.errors import ConvertError, one_line
from neox_train.model import param_groups

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# The config fields that decide the tensors' shapes: quoted when a checkpoint's weights and config
# disagree.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


class _PageDropper:
    """Give memory back to the kernel as soon as a source tensor has been copied out.

    Peak RSS should stay near one copy of the output, but every page read from a memory-mapped
    checkpoint file counts in RSS until the mapping goes away, which for the fp32 partitions would
    be the whole fp32 model by the end. madvise(MADV_DONTNEED) on a read-only private file mapping
    drops those pages from this process (they stay in the page cache, and are read back from it if
    touched again), so only the tensor being copied is resident. Only ranges of files mapped by
    torch.load(mmap=True) are ever passed here.
    """

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            # Each tensor also passes through short-lived fp32/rounded copies of a few MB. glibc
            # raises its mmap threshold after the first large free and then serves such sizes from
            # the heap, where the holes they leave measured +50% of a 400M model's bf16 output; a
            # fixed 1 MiB threshold unmaps each one on free.
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not Linux/glibc: memory use is just higher
            self._madvise = None
        self.dontneed = getattr(mmap, "MADV_DONTNEED", 4)

    def drop(self, ptr: int, nbytes: int) -> None:
        if self._madvise is None or nbytes <= 0:
            return
        # inward: never touch a page shared with bytes outside the range
        start = -(-ptr // self.page) * self.page
        end = (ptr + nbytes) // self.page * self.page
        if end > start:
            self._madvise(start, end - start, self.dontneed)


class WeightSource:
    """The checkpoint's weights by HF parameter name, fp32 where masters exist. Single use:
    `take(name)` returns a tensor that owns its memory and may release the source bytes behind
    it."""

    def __init__(self, info: CheckpointInfo):
        self.info = info
        self._model = meta_model(info)
        # name -> the shape the config implies: what the checkpoint's tensors must be
        self.expected = {name: tuple(t.shape) for name, t in self._model.state_dict().items()}
        self.dropper = _PageDropper()
        self._lazy: dict[str, Any] = {}  # name -> tensor or zero_to_fp32 GatheredTensor
        # training-precision module weights, for the consistency check
        self._module: dict[str, torch.Tensor] = {}
        self._mapped: list[tuple[int, int]] = []  # whole file mappings: safe to drop at any time
        self.masters = False
        self.description = ""
        self._taken: set[str] = set()

    # building
    def open(self) -> "WeightSource":
        info = self.info
        if info.stage == 0:
            self._open_stage0()
        else:
            self._open_zero()
            self._check_layout(self._lazy, f"its ZeRO-{info.stage} fp32 master weights")
        return self

    def _check_layout(self, tensors: dict[str, Any], what: str) -> None:
        """The tensors the config implies, each of the shape it implies, and no others; on shapes
        alone (no byte is read), before anything is written. Weights of another model would
        otherwise export with exit 0: into a folder transformers rejects, or with the embedding
        silently cut to the config's vocabulary."""
        cfg, where = self.info.model_config, f"checkpoint {self.info.tag_dir}"
        said = (f"its {self.info.config_source} "
                f"({', '.join(f'{k}={cfg.get(k)}' for k in SHAPE_KEYS)})")
        missing = [n for n in self.expected if n not in tensors]
        extra = [n for n in tensors if n not in self.expected]
        if missing or extra:
            raise ConvertError(f"{where}: the tensors in {what} are not the ones {said} implies: "
                               f"missing {_some(missing)}; unexpected {_some(extra)}")
        wrong = [(n, list(tensors[n].shape), list(s)) for n, s in self.expected.items()
                 if tuple(tensors[n].shape) != s]
        if wrong:
            (name, got, want), more = wrong[0], len(wrong) - 1
            others = (f" ({more} more tensor{'s differ' if more > 1 else ' differs'})" if more
                      else "")
            raise ConvertError(f"{where}: {name} has shape {got} in {what}, but {said} expects "
                               f"{want}; the config and the weights are of different "
                               f"models{others}")

    def _open_stage0(self) -> None:
        states = torch_load(self.info.model_states)
        module = states["module"]
        # before the masters are matched to the names
        self._check_layout(module, self.info.model_states.name)
        self._module = dict(module)
        masters = self._stage0_masters(states)
        # module and masters live in the same file: one span
        self._map_file(list(module.values()) + (list(masters.values()) if masters else []))
        if masters is not None:
            self._lazy = masters
            self.masters = True
            self.description = "fp32 master weights of DeepSpeed's fp16/bf16 optimizer (ZeRO-0)"
        else:
            self._lazy = dict(module)
            self._module = {}
            dtype = next(iter(module.values())).dtype if module else torch.float32
            self.description = (f"module weights in {str(dtype).replace('torch.', '')} "
                                f"(ZeRO-0 keeps no fp32 masters here)")

    def _stage0_masters(self, states: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """DeepSpeed's fp16/bf16 optimizer at stage 0 saves its fp32 copies per param group, in the
        order of the groups handed to the optimizer, without names. The trainer builds those groups
        with `param_groups`; doing the same on a shape-only model gives the names. Any shape
        disagreement means another grouping: then the module weights are used, and said so."""
        opt = states.get("optimizer")
        if not isinstance(opt, dict):
            return None
        if "fp32_groups" in opt:
            groups = [list(g) for g in opt["fp32_groups"]]
        elif "fp32_groups_flat" in opt:
            # split below by the group's shapes
            groups = [[flat] for flat in opt["fp32_groups_flat"]]
        else:
            return None

        model = self._model
        names = {id(p): n for n, p in model.named_parameters()}
        layout = [[(names[id(p)], tuple(p.shape)) for p in g["params"]]
                  for g in param_groups(model, 0.0)]
        layout = [g for g in layout if g] if len(layout) != len(groups) else layout
        if len(layout) != len(groups):
            return self._no_masters(f"{len(groups)} optimizer groups, expected {len(layout)}")
        out: dict[str, torch.Tensor] = {}
        for tensors, named in zip(groups, layout):
            # a flat group: consecutive tensors, no padding
            if len(tensors) == 1 and len(named) > 1:
                flat = tensors[0]
                if flat.numel() != sum(math.prod(s) for _, s in named):
                    return self._no_masters("flat group size differs from the model's")
                offset, tensors = 0, []
                for _, shape in named:
                    n = math.prod(shape)
                    tensors.append(flat.narrow(0, offset, n).view(shape))
                    offset += n
            if [tuple(t.shape) for t in tensors] != [s for _, s in named]:
                return self._no_masters("parameter shapes differ from the model's grouping")
            out.update({name: t for (name, _), t in zip(named, tensors)})
        return out

    def _no_masters(self, why: str) -> None:
        print("neox-convert-hf: warning: fp32 master weights found but not matched to names "
              f"({why}); using the module weights", file=sys.stderr)
        return None

    def _open_zero(self) -> None:
        tag_dir = self.info.tag_dir
        try:
            with stdout_to_stderr():
                self._lazy, per_rank = lazy_fp32_masters(tag_dir, self.info.stage)
        except ConvertError:
            raise
        # zero_to_fp32 raises ValueError/FileNotFoundError/RuntimeError on bad shards
        except Exception as err:
            raise ConvertError(
                f"{tag_dir}: DeepSpeed's zero_to_fp32 cannot read this ZeRO-{self.info.stage} "
                f"checkpoint, a file is truncated, corrupt or from another run ({one_line(err)})"
            ) from None
        self.masters = True
        self.description = (f"fp32 master weights of ZeRO-{self.info.stage} x {self.info.dp_size} "
                            f"rank(s) (deepspeed.utils.zero_to_fp32)")
        # The fp32 partitions stay memory-mapped, one file per rank; each parameter is gathered when
        # taken.
        for rank_tensors in per_rank:
            self._map_file(rank_tensors)
        if self.info.stage in (1, 2):
            states = torch_load(self.info.model_states)
            self._module = {k: v for k, v in states["module"].items() if v.numel()}
            self._map_file(list(self._module.values()))

    def _map_file(self, tensors: list[torch.Tensor]) -> None:
        """Record the byte span of tensors memory-mapped from ONE file. torch.load(mmap=True) maps
        the whole file as one private mapping, so everything between the first and last tensor is
        that file: safe to drop."""
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors
                 if t.numel()]
        if spans:
            start = min(p for p, _ in spans)
            self._mapped.append((start, max(p + n for p, n in spans) - start))

    # reading
    def take(self, name: str, dtype: torch.dtype | None = None,
             rows: int | None = None) -> torch.Tensor:
        """The tensor (first `rows` rows only, when given) as `dtype`, in memory it owns, after
        checking it against the module's weights; the source bytes behind it are then released."""
        if name in self._taken:
            raise RuntimeError(f"{name} was already taken from this WeightSource (its source bytes "
                               "may be released)")
        self._taken.add(name)
        lazy = self._lazy[name]
        # GatheredTensor: gather ranks now
        full = lazy if isinstance(lazy, torch.Tensor) else lazy.contiguous()
        self._check(name, full)
        part = full if rows is None else full[:rows]
        # a copy: the source may be a mapping about to be dropped
        out = part.to(dtype or part.dtype, copy=True)
        del full, part
        self._release(name)
        return out

    def _check(self, name: str, full: torch.Tensor) -> None:
        ref = self._module.get(name)
        if ref is None:
            return
        rounded = full.to(ref.dtype)
        if rounded.shape != ref.shape or not torch.equal(rounded, ref):
            worst = ((rounded.float() - ref.float()).abs().max().item()
                     if rounded.shape == ref.shape else float("nan"))
            raise ConvertError(
                f"{self.info.tag_dir}: the fp32 master weights of {name} do not match the module's "
                f"{str(ref.dtype).replace('torch.', '')} weights (max diff {worst:.3g}): the "
                f"checkpoint's files are inconsistent or corrupt"
            )

    def _release(self, name: str) -> None:
        for ptr, nbytes in self._mapped:
            self.dropper.drop(ptr, nbytes)

    def close(self) -> None:
        self._lazy.clear()
        self._module.clear()
        self._mapped.clear()


def _some(names: list[str]) -> str:
    if not names:
        return "none"
    return f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)} in all)"


def meta_model(info: CheckpointInfo):
    """A shape-only GPTNeoXForCausalLM of the checkpoint's config (no memory): names, shapes and
    which tensors are embeddings; a config transformers cannot build a model of is one line naming
    it."""

    try:
        cfg = GPTNeoXConfig.from_dict(info.model_config)
        with torch.device("meta"):
            return GPTNeoXForCausalLM(cfg)
    # transformers' validators raise ValueError/TypeError subclasses, torch RuntimeError
    except Exception as err:
        raise ConvertError(f"checkpoint {info.tag_dir}: transformers cannot build a GPTNeoX model "
                           f"from its {info.config_source} ({one_line(err)})") from None
