"""Reading a DeepSpeed checkpoint for `neox-convert-hf`: where it is, what it is, and its weights one tensor at a time.

Everything here is checked from file names and the small JSON/pickled headers before any weight is read, so bad input
fails in a second with one line. The weights themselves come from DeepSpeed's own formats:

- ZeRO-1/2/3: `deepspeed.utils.zero_to_fp32` in lazy mode (the fp32 master partitions, memory-mapped);
- ZeRO-0: `mp_rank_00_model_states.pt["module"]` (zero_to_fp32 refuses stage 0), and the fp32 masters that
  DeepSpeed's fp16/bf16 optimizer keeps next to it when the run trained in bf16/fp16.

Where both the module's training-precision weights and fp32 masters exist, each master, rounded to the module's
dtype, must equal the module's tensor bit for bit (DeepSpeed copies the rounded masters into the module after every
step): a cheap proof that the partitions were stitched together under the right names.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from neox_train.checkpoint import commit
from neox_train.checkpoint.tags import TAG_RE, local_tags, step_of_tag
from neox_train.errors import ConvertError, one_line

MODEL_STATES_Z012 = "mp_rank_00_model_states.pt"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """zero_to_fp32 reports progress with print(); stdout is reserved for `--json`."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- where the checkpoint is ------------------------------------------------------------------------------------------


@dataclass
class Located:
    """A checkpoint tag folder on local disk, and how it got there."""

    tag_dir: Path
    source: str  # what the user named (folder or URL), for messages and the model card
    remote: str | None = None  # the bucket URL it was fetched from (verified against its manifest)
    cleanup: Callable[[], None] = field(default=lambda: None)


def _is_published(folder: Path) -> bool:
    """A bucket-layout folder (sync.py): some tag has a manifest or COMPLETE marker. A save dir never has either."""
    return any((folder / t / name).is_file() for t in local_tags(folder) for name in ("manifest.json", "COMPLETE"))


def _looks_like_tag_dir(folder: Path) -> bool:
    return any(folder.glob("*model_states.pt"))


def _check_intact(tag_dir: Path) -> None:
    """A tag with a completeness marker must be complete and match it byte for byte (read once here, before the
    conversion reads it again). One without a marker (written before neox-train had them, or by something else)
    goes to the conversion's own checks, with a note."""
    if not (tag_dir / commit.MARKER).exists():
        status = commit.inspect(tag_dir.parent, tag_dir.name)
        if not status.legacy:
            print(f"neox-convert-hf: {tag_dir} has no completeness marker (written before neox-train had them, or not "
                  f"by neox-train): converting it as it is, with the conversion's own checks", file=sys.stderr)
        return
    status = commit.inspect(tag_dir.parent, tag_dir.name)
    problem = status.problem or commit.verify(tag_dir.parent, status)
    if problem:
        raise ConvertError(f"checkpoint {tag_dir} is damaged or incomplete: {problem}")


def locate(source: str, tag: str | None, *, credentials: str | None, scratch_parent: Path) -> Located:
    """Resolve CHECKPOINT (+ --tag) to one tag folder on local disk.

    gs:// and file:// URLs are published checkpoint prefixes: only a COMPLETE tag is used, fetched with
    sync.fetch_checkpoint (every file checked against the manifest) into a scratch folder next to the output.
    A plain folder is a run's save dir (its newest complete tag, or --tag), or one tag folder itself; a tag is
    verified against its completeness marker first. A folder holding published tags (manifest.json + COMPLETE) is
    read like a bucket, so its manifest is checked too.
    """
    want = None if tag in (None, "latest") else tag
    if want is not None and not TAG_RE.match(want) and ("/" in want or want.startswith(".")):
        raise ConvertError(f"--tag {tag!r} is not a checkpoint tag (valid: latest or a folder name like "
                           f"global_step100)")
    if "://" in source:
        return _fetch_published(source, want, credentials=credentials, scratch_parent=scratch_parent)

    path = Path(source).expanduser()
    if not path.exists():
        raise ConvertError(f"{source} does not exist (expected a checkpoint folder such as checkpoints/demo, or "
                           f"gs://bucket/prefix)")
    if not path.is_dir():
        raise ConvertError(f"{source} is a file, not a checkpoint folder (expected SAVE_DIR with global_stepN/ "
                           f"folders)")
    path = path.resolve()
    if _looks_like_tag_dir(path):
        if want is not None and want != path.name:
            raise ConvertError(f"{source} is the checkpoint {path.name} itself; --tag {tag} names another one "
                               f"(drop --tag, or give the save dir)")
        tag_dir = path
    else:
        tags = local_tags(path)
        pointer = path / "latest"
        if not tags and not pointer.is_file():
            raise ConvertError(
                f"{source} is not a DeepSpeed checkpoint folder: no 'latest' file, no global_stepN/ folders and no "
                f"*model_states.pt (expected the save dir of a neox-train run, e.g. checkpoints/demo)"
            )
        if want is None and not _is_published(path):
            complete = commit.complete_tags(path)
            if not complete:
                torn = "; ".join(f"{s.tag}: {s.problem}" for s in commit.statuses(path)[-3:])
                raise ConvertError(f"{source} holds no complete checkpoint ({torn or 'no global_stepN folder'}); "
                                   f"pass --tag to convert one as it is")
            want = complete[-1]
            named, why = commit.read_latest(path)
            if named != want:
                problem = commit.inspect(path, named).problem if named else why
                print(f"neox-convert-hf: {source}/latest {f'names {named}: ' if named else ''}{problem or 'is older'}; "
                      f"converting the newest complete checkpoint, {want}", file=sys.stderr)
        elif want is None:
            if not pointer.is_file():
                raise ConvertError(f"{source} has no 'latest' file; pass --tag (available: {', '.join(tags)})")
            want = pointer.read_text().strip()
        tag_dir = path / want
        if not tag_dir.is_dir():
            raise ConvertError(
                f"checkpoint tag {want!r} not found in {source} (available: {', '.join(tags) or 'none'})"
            )
    if _is_published(tag_dir.parent):
        # A published copy (e.g. the demo's local "bucket"): same rules as a bucket, COMPLETE + manifest check, so a
        # tag still uploading (files there, no COMPLETE yet) is refused rather than converted half-written.
        return _fetch_published(str(tag_dir.parent), tag_dir.name, credentials=None, scratch_parent=scratch_parent,
                                shown_as=source)
    _check_intact(tag_dir)
    return Located(tag_dir=tag_dir, source=source)


def _fetch_published(url: str, tag: str | None, *, credentials: str | None, scratch_parent: Path,
                     shown_as: str | None = None) -> Located:
    from neox_train.checkpoint.publication import fetch_checkpoint, remote_checkpoints, remote_latest
    from neox_train.remote import open_backend

    backend = open_backend(url, credentials=credentials)
    if tag is None:
        tag = remote_latest(backend)
        if tag is None:
            raise ConvertError(f"{url}: no COMPLETE checkpoint there (a published checkpoint counts once its "
                               f"COMPLETE marker exists)")
    elif tag not in remote_checkpoints(backend):
        complete = remote_checkpoints(backend)
        raise ConvertError(
            f"{url}: checkpoint tag {tag!r} is not a COMPLETE published checkpoint "
            f"(complete: {', '.join(complete) or 'none'})"
        )
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".neox-convert-fetch-", dir=scratch_parent))
    print(f"neox-convert-hf: fetching {url}/{tag} (verified against its manifest)", file=sys.stderr)
    try:
        tag_dir = fetch_checkpoint(backend, tag, scratch, progress=sys.stderr.isatty())
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Located(tag_dir=tag_dir, source=shown_as or url, remote=url,
                   cleanup=lambda: shutil.rmtree(scratch, ignore_errors=True))


# -- what the checkpoint is -------------------------------------------------------------------------------------------


def torch_load(path: Path) -> dict[str, Any]:
    """torch.load memory-mapped: nothing is read until a tensor is touched, so the optimizer moments cost nothing.

    weights_only=False because DeepSpeed pickles its own objects (enums, configs) into these files, as zero_to_fp32
    itself loads them: convert only checkpoints you trust, as with any pickle."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing: the checkpoint is incomplete") from None
    except Exception as err:  # torch reports truncation/corruption as RuntimeError, pickle errors, EOFError, ...
        raise ConvertError(f"{path} cannot be read, it is truncated or corrupt ({one_line(err)})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a {type(obj).__name__}, not a DeepSpeed state dict")
    return obj


@dataclass
class CheckpointInfo:
    tag_dir: Path
    tag: str
    stage: int
    dp_size: int
    precision: str  # what the run trained in: bf16, fp16 or fp32
    model_config: dict[str, Any]
    run: dict[str, Any]  # run.json (or the same keys from the client state): step, consumed_samples, run_config, ...
    model_states: Path  # the file holding the module (rank 0's for ZeRO-3)

    @property
    def step(self) -> int | None:
        step = self.run.get("step")
        if step is None:
            step = step_of_tag(self.tag)
        return step


def _rank_files(tag_dir: Path, kind: str) -> dict[int, Path]:
    out = {}
    for p in tag_dir.glob(f"*_{kind}_states.pt"):
        m = _RANK_RE.search(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _precision_of(ds_config: dict[str, Any]) -> str:
    if (ds_config.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (ds_config.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"


def inspect_checkpoint(tag_dir: Path) -> CheckpointInfo:
    """Stage, world size, precision and model config, from file names and the model-states header (mmap: cheap).

    Every rank's file must be present before anything is converted: a checkpoint that one rank never finished
    writing would otherwise fail deep inside zero_to_fp32, or not at all."""
    z3_model = _rank_files(tag_dir, "model")
    optim = _rank_files(tag_dir, "optim")
    if (tag_dir / MODEL_STATES_Z012).is_file():
        states_path = tag_dir / MODEL_STATES_Z012
    elif 0 in z3_model:
        states_path = z3_model[0]
    else:
        found = ", ".join(sorted(p.name for p in tag_dir.iterdir())[:8]) or "nothing"
        raise ConvertError(
            f"{tag_dir} is not a DeepSpeed checkpoint: no {MODEL_STATES_Z012} nor "
            f"zero_pp_rank_0_mp_rank_00_model_states.pt (found: {found})"
        )
    states = torch_load(states_path)
    if "module" not in states:
        raise ConvertError(f"{states_path} has no 'module' entry: not a DeepSpeed model-states file")

    ds_config = states.get("ds_config") if isinstance(states.get("ds_config"), dict) else {}
    run = _read_run_json(tag_dir) or {k: states[k] for k in ("step", "consumed_samples", "dp_size", "data_tokens",
                                                             "run_config", "ds_config") if k in states}
    if not ds_config:
        ds_config = run.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    dp_size = int(states.get("dp_world_size") or run.get("dp_size") or 1)

    if stage == 3:
        missing = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(dp_size)
                   for kind, have in (("model", z3_model), ("optim", optim)) if r not in have]
    elif stage in (1, 2):
        missing = [f"(bf16_)zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(dp_size) if r not in optim]
    else:
        missing = []
    if missing:
        raise ConvertError(
            f"{tag_dir} is a ZeRO-{stage} checkpoint of {dp_size} ranks but lacks {', '.join(missing)}: a rank never "
            f"finished writing it (convert another tag)"
        )

    model_config = _read_model_config(tag_dir, states, states_path)
    return CheckpointInfo(tag_dir=tag_dir, tag=tag_dir.name, stage=stage, dp_size=dp_size,
                          precision=_precision_of(ds_config), model_config=model_config, run=run,
                          model_states=states_path)


def _read_run_json(tag_dir: Path) -> dict[str, Any] | None:
    path = tag_dir / "run.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path} is not valid JSON ({one_line(err)})") from None
    return data if isinstance(data, dict) else None


def _read_model_config(tag_dir: Path, states: dict[str, Any], states_path: Path) -> dict[str, Any]:
    """The HF config the run trained: TAG/config.json (written by neox-train), else the client state's copy."""
    path = tag_dir / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConvertError(f"{path} is not valid JSON ({one_line(err)})") from None
    else:
        cfg = states.get("model_config")
        if not isinstance(cfg, dict):
            raise ConvertError(
                f"{tag_dir} holds no model config (no config.json, and no 'model_config' in {states_path.name}'s "
                f"client state): it was not written by neox-train, so the architecture is unknown"
            )
    if cfg.get("model_type") != "gpt_neox":
        raise ConvertError(f"{tag_dir}: model config has model_type={cfg.get('model_type')!r}; only 'gpt_neox' "
                           f"converts")
    return cfg


# -- the weights --------------------------------------------------------------------------------------------------


class _PageDropper:
    """Give memory back to the kernel as soon as a source tensor has been copied out.

    Peak RSS should stay near one copy of the output, but every page read from a memory-mapped checkpoint file
    counts in RSS until the mapping goes away, which for the fp32 partitions would be the whole fp32 model by the
    end. madvise(MADV_DONTNEED) on a read-only private file mapping drops those pages from this process (they stay
    in the page cache, and are read back from it if touched again), so only the tensor being copied is resident.
    Only ranges of files mapped by torch.load(mmap=True) are ever passed here.
    """

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            # Each tensor also passes through short-lived fp32/rounded copies of a few MB. glibc raises its mmap
            # threshold after the first large free and then serves such sizes from the heap, where the holes they
            # leave measured +50% of a 400M model's bf16 output; a fixed 1 MiB threshold unmaps each one on free.
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not Linux/glibc: memory use is just higher
            self._madvise = None
        self.dontneed = getattr(mmap, "MADV_DONTNEED", 4)

    def drop(self, ptr: int, nbytes: int) -> None:
        if self._madvise is None or nbytes <= 0:
            return
        start = -(-ptr // self.page) * self.page  # inward: never touch a page shared with bytes outside the range
        end = (ptr + nbytes) // self.page * self.page
        if end > start:
            self._madvise(start, end - start, self.dontneed)


class WeightSource:
    """The checkpoint's weights by HF parameter name, fp32 where masters exist. Single use: `take(name)` returns a
    tensor that owns its memory and may release the source bytes behind it."""

    def __init__(self, info: CheckpointInfo, names: list[str]):
        self.info = info
        self.expected = names
        self.dropper = _PageDropper()
        self._lazy: dict[str, Any] = {}  # name -> tensor or zero_to_fp32 GatheredTensor
        self._module: dict[str, torch.Tensor] = {}  # training-precision module weights, for the consistency check
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
        missing = [n for n in self.expected if n not in self._lazy]
        extra = [n for n in self._lazy if n not in self.expected]
        if missing or extra:
            raise ConvertError(
                f"{info.tag_dir}: its weights do not match its model config (missing: "
                f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})"
            )
        return self

    def _open_stage0(self) -> None:
        states = torch_load(self.info.model_states)
        module = states["module"]
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
        """DeepSpeed's fp16/bf16 optimizer at stage 0 saves its fp32 copies per param group, in the order of the
        groups handed to the optimizer, without names. The trainer builds those groups with `param_groups`; doing
        the same on a shape-only model gives the names. Any shape disagreement means another grouping: then the
        module weights are used, and said so."""
        opt = states.get("optimizer")
        if not isinstance(opt, dict):
            return None
        if "fp32_groups" in opt:
            groups = [list(g) for g in opt["fp32_groups"]]
        elif "fp32_groups_flat" in opt:
            groups = [[flat] for flat in opt["fp32_groups_flat"]]  # split below by the group's shapes
        else:
            return None
        from neox_train.train.trainer import param_groups

        model = meta_model(self.info.model_config)
        names = {id(p): n for n, p in model.named_parameters()}
        layout = [[(names[id(p)], tuple(p.shape)) for p in g["params"]] for g in param_groups(model, 0.0)]
        layout = [g for g in layout if g] if len(layout) != len(groups) else layout
        if len(layout) != len(groups):
            return self._no_masters(f"{len(groups)} optimizer groups, expected {len(layout)}")
        out: dict[str, torch.Tensor] = {}
        for tensors, named in zip(groups, layout):
            if len(tensors) == 1 and len(named) > 1:  # a flat group: consecutive tensors, no padding
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
        print(f"neox-convert-hf: warning: fp32 master weights found but not matched to names ({why}); "
              f"using the module weights", file=sys.stderr)
        return None

    def _open_zero(self) -> None:
        from deepspeed.utils import zero_to_fp32

        tag_dir = self.info.tag_dir
        deferred = _DeferredTorch() if self.info.stage in (1, 2) else None
        try:
            with stdout_to_stderr(), _patched(zero_to_fp32, "torch", deferred):
                lazy = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                    str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
        except ConvertError:
            raise
        except Exception as err:  # zero_to_fp32 raises ValueError/FileNotFoundError/RuntimeError on bad shards
            raise ConvertError(
                f"{tag_dir}: DeepSpeed's zero_to_fp32 cannot read this ZeRO-{self.info.stage} checkpoint, a file is "
                f"truncated, corrupt or from another run ({one_line(err)})"
            ) from None
        self._lazy = dict(lazy)
        self.masters = True
        self.description = (f"fp32 master weights of ZeRO-{self.info.stage} x {self.info.dp_size} rank(s) "
                            f"(deepspeed.utils.zero_to_fp32)")
        # The fp32 partitions stay memory-mapped, one file per rank; each parameter is gathered when taken.
        if deferred is not None:
            per_rank = [list(group) for group in zip(*(cat.parts for cat in deferred.cats))]
        else:
            gathered = next((v for v in self._lazy.values() if isinstance(v, zero_to_fp32.GatheredTensor)), None)
            per_rank = [list(groups) for groups in gathered.flat_groups] if gathered is not None else []
        for rank_tensors in per_rank:
            self._map_file(rank_tensors)
        if self.info.stage in (1, 2):
            states = torch_load(self.info.model_states)
            self._module = {k: v for k, v in states["module"].items() if v.numel()}
            self._map_file(list(self._module.values()))

    def _map_file(self, tensors: list[torch.Tensor]) -> None:
        """Record the byte span of tensors memory-mapped from ONE file. torch.load(mmap=True) maps the whole file as
        one private mapping, so everything between the first and last tensor is that file: safe to drop."""
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors if t.numel()]
        if spans:
            start = min(p for p, _ in spans)
            self._mapped.append((start, max(p + n for p, n in spans) - start))

    # reading
    def take(self, name: str, dtype: torch.dtype | None = None, rows: int | None = None) -> torch.Tensor:
        """The tensor (first `rows` rows only, when given) as `dtype`, in memory it owns, after checking it against
        the module's weights; the source bytes behind it are then released."""
        if name in self._taken:
            raise RuntimeError(f"{name} was already taken from this WeightSource (its source bytes may be released)")
        self._taken.add(name)
        lazy = self._lazy[name]
        full = lazy if isinstance(lazy, torch.Tensor) else lazy.contiguous()  # GatheredTensor: gather ranks now
        self._check(name, full)
        part = full if rows is None else full[:rows]
        out = part.to(dtype or part.dtype, copy=True)  # a copy: the source may be a mapping about to be dropped
        del full, part
        self._release(name)
        return out

    def _check(self, name: str, full: torch.Tensor) -> None:
        ref = self._module.get(name)
        if ref is None:
            return
        rounded = full.to(ref.dtype)
        if rounded.shape != ref.shape or not torch.equal(rounded, ref):
            worst = (rounded.float() - ref.float()).abs().max().item() if rounded.shape == ref.shape else float("nan")
            raise ConvertError(
                f"{self.info.tag_dir}: the fp32 master weights of {name} do not match the module's "
                f"{str(ref.dtype).replace('torch.', '')} weights (max diff {worst:.3g}): the checkpoint's files are "
                f"inconsistent or corrupt"
            )

    def _release(self, name: str) -> None:
        for ptr, nbytes in self._mapped:
            self.dropper.drop(ptr, nbytes)

    def close(self) -> None:
        self._lazy.clear()
        self._module.clear()
        self._mapped.clear()


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

    That merge concatenates every rank's fp32 partition of a parameter group into one new buffer, then hands out
    narrow().view() slices of it: the whole fp32 model in memory at once, plus the mapped file pages it was copied
    from (its own comment: "memory usage doubles here"). Deferring the concatenation keeps every offset, padding
    and shape DeepSpeed's code computes, but a slice only reads its bytes from the mapped partitions when taken.
    Any misreading would surface at once: each master is compared bit for bit with the module's weights."""

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
            raise ValueError(f"narrow({dim}, {start}, {length}) outside a deferred vector of {self.numel()} elements")
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
        """Copy the slice out of the partitions it spans (one new tensor; the partitions are not touched elsewhere)."""
        src, end, pieces = self.source, self.start + self.length, []
        for part, lo, hi in zip(src.parts, src.starts, src.starts[1:]):
            if hi > self.start and lo < end:
                pieces.append(part[max(self.start, lo) - lo: min(end, hi) - lo])
        return torch.cat(pieces).view(self.shape) if len(pieces) != 1 else pieces[0].clone().view(self.shape)


def meta_model(model_config: dict[str, Any]):
    """A shape-only GPTNeoXForCausalLM of the config (no memory): names, shapes and which tensors are embeddings."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig.from_dict(model_config)
    with torch.device("meta"):
        return GPTNeoXForCausalLM(cfg)
