"""Writing the HuggingFace folder for `neox-convert-hf`: safetensors shards streamed one shard at a
time, config.json, generation_config.json, tokenizer files and a model card.

Names, shard layout and index follow what transformers' own `save_pretrained` writes (its key
renaming for GPTNeoX, huggingface_hub's shard split, safetensors with {"format": "pt"}), so the
folder is indistinguishable from one saved by transformers, but no full state dict is ever held:
each shard's tensors are taken from the checkpoint, written and dropped before the next shard
starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import GenerationConfig, GPTNeoXConfig, PreTrainedTokenizerFast
from transformers.core_model_loading import revert_weight_conversion

from neox_train.convert.source import CheckpointInfo
from neox_train.convert.weights import WeightSource, meta_model
from neox_train.data.shards import EOS_CANDIDATES, TOKENIZER_FILE, dataset_folder
from neox_train.errors import ConvertError, one_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# -- the plan: names, shapes, vocabulary -----------------------------------------------------------


@dataclass
class ExportPlan:
    dtype: torch.dtype
    module_names: list[str]  # the model's own parameter names, in the order they are written
    # module name -> name in the safetensors files (transformers' save-time renaming)
    disk_names: dict[str, str]
    # module name -> output shape (vocab rows already cut when unpadding)
    shapes: dict[str, tuple[int, ...]]
    embedding_names: tuple[str, ...]  # the tensors whose rows are vocabulary entries
    vocab_size: int  # of the output
    padded_vocab_size: int  # of the checkpoint

    @property
    def unpadded(self) -> bool:
        return self.vocab_size != self.padded_vocab_size

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def plan_export(info: CheckpointInfo, dtype: torch.dtype, vocab_size: int | None) -> ExportPlan:
    """What will be written, from a shape-only model: nothing is allocated."""

    model = meta_model(info)
    state = model.state_dict()
    padded = int(info.model_config["vocab_size"])
    vocab = padded if vocab_size is None else vocab_size
    embeddings = tuple(
        name for name, p in model.named_parameters()
        if p is model.get_input_embeddings().weight or p is model.get_output_embeddings().weight
    )
    # save_pretrained stores some parameters under their historical names (GPTNeoX's head: lm_head
    # -> embed_out), which is what older transformers versions and other tools read. Ask
    # transformers for that renaming rather than hard-coding it; shape-only tensors are enough,
    # since only the keys change.
    reverted = revert_weight_conversion(model, dict(state))
    by_id = {id(t): name for name, t in state.items()}
    disk_names: dict[str, str] = {}
    for disk_name, t in reverted.items():
        if id(t) not in by_id:
            raise ConvertError("transformers' save-time conversion for GPTNeoX does more than "
                               "rename keys; this transformers version is not supported by "
                               "neox-convert-hf")
        disk_names[by_id[id(t)]] = disk_name
    order = list(disk_names)  # transformers' save order (natural sort of the names)
    shapes = {n: tuple(state[n].shape) for n in order}
    for n in embeddings:
        shapes[n] = (vocab, *shapes[n][1:])
    return ExportPlan(dtype=dtype, module_names=order, disk_names=disk_names, shapes=shapes,
                      embedding_names=embeddings, vocab_size=vocab, padded_vocab_size=padded)


# -- weights ---------------------------------------------------------------------------------------


def parse_shard_size(text: str) -> int:
    """'2GB', '500MB', '10GiB' or a byte count, as huggingface_hub reads max_shard_size."""

    try:
        size = int(text) if text.isdigit() else parse_size_to_int(text)
    except ValueError:
        raise ConvertError(f"--max-shard-size {text!r} is not a size (valid: e.g. 2GB, 500MB, "
                           "10GiB or bytes)") \
            from None
    if size < 1:
        raise ConvertError(f"--max-shard-size {text!r} must be positive")
    return size


def write_weights(source: WeightSource, plan: ExportPlan, out_dir: Path, max_shard_size: int, *,
                  progress: bool = False) -> dict[str, Any]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above
    the limit.

    The split is huggingface_hub's (the one save_pretrained uses), computed on shape-only tensors;
    then each shard's tensors are taken from the source in the output dtype, written, and freed.
    Peak memory: one shard."""

    shapes_only = {plan.disk_names[n]: torch.empty(plan.shapes[n], dtype=plan.dtype, device="meta")
                   for n in plan.module_names}
    split = split_torch_state_dict_into_shards(shapes_only,
                                               filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    module_of = {d: m for m, d in plan.disk_names.items()}
    bar = tqdm(total=len(plan.module_names), desc="write weights", unit="tensor",
               disable=not progress)
    for filename, disk_names in split.filename_to_tensors.items():
        shard: dict[str, torch.Tensor] = {}
        # Largest first: taking a tensor briefly holds its fp32 gather and source pages (for the
        # vocabulary matrices, hundreds of MB), better done while the shard holds little. The file's
        # layout does not depend on this order.
        for disk_name in sorted(disk_names, key=lambda d: -math.prod(plan.shapes[module_of[d]])):
            name = module_of[disk_name]
            rows = plan.vocab_size if name in plan.embedding_names else None
            shard[disk_name] = source.take(name, plan.dtype, rows=rows)
            bar.update(1)
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        shard.clear()
        # safetensors creates files 0600; an export is meant to be shared, so give them the umask's
        # usual mode.
        os.chmod(out_dir / filename, 0o666 & ~_umask())
    bar.close()
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return {"files": files, "total_size": int(split.metadata.get("total_size", 0)),
            "sharded": split.is_sharded}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- tokenizer -------------------------------------------------------------------------------------


@dataclass
class TokenizerInfo:
    path: Path
    vocab_size: int  # with added tokens: every id the tokenizer can produce is below this
    eos_token: str | None
    eos_token_id: int | None
    explicit: bool  # named by --tokenizer (a mismatch is an error, not a warning)


def resolve_run_path(value: str | None, info: CheckpointInfo, *,
                     local_save_dir: Path | None) -> list[Path]:
    """Where a run-config path (data_dir, log_dir) may be now. Relative paths were relative to the
    training's working directory, which is recovered from the save dir: if SAVE_DIR is
    /x/checkpoints/demo and the run said save_dir="checkpoints/demo", the run started in /x."""
    if not value:
        return []
    path = Path(value)
    if path.is_absolute():
        return [path]
    candidates = [Path.cwd() / path]
    saved_as = (info.run.get("run_config") or {}).get("save_dir")
    if local_save_dir is not None and saved_as and not Path(saved_as).is_absolute():
        parts = Path(saved_as).parts
        if tuple(local_save_dir.parts[-len(parts):]) == parts:
            candidates.append(local_save_dir.parents[len(parts) - 1] / path)
    return candidates


def find_tokenizer(explicit: str | None, info: CheckpointInfo, *,
                   local_save_dir: Path | None) -> TokenizerInfo | None:
    """--tokenizer, else one stored in the checkpoint tag, else the run's data_dir/tokenizer.json
    (prepare.py's)."""
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ConvertError(
                f"--tokenizer {explicit}: no such file (expected a HuggingFace tokenizer.json)")
        return _load_tokenizer_info(path, explicit=True)
    candidates = [info.tag_dir / TOKENIZER_FILE]
    data_dir = (info.run.get("run_config") or {}).get("data_dir")
    # The dataset's folder however it was named (a folder, or an indexed PREFIX beside its
    # tokenizer.json).
    candidates += [dataset_folder(d) / TOKENIZER_FILE
                   for d in resolve_run_path(data_dir, info, local_save_dir=local_save_dir)]
    for path in candidates:
        if path.is_file():
            return _load_tokenizer_info(path, explicit=False)
    return None


def _load_tokenizer_info(path: Path, *, explicit: bool) -> TokenizerInfo:
    try:
        tok = Tokenizer.from_file(str(path))
    # the Rust side raises a bare Exception for missing and malformed files alike
    except Exception as err:
        raise ConvertError(f"{path}: cannot load tokenizer ({one_line(err)}); expected a "
                           f"HuggingFace tokenizer.json") from None
    eos = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    return TokenizerInfo(path=path, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                         eos_token=eos, eos_token_id=tok.token_to_id(eos) if eos else None,
                         explicit=explicit)


def check_tokenizer(tok: TokenizerInfo, model_vocab: int, eos_token_id: int | None) -> str | None:
    """Why this tokenizer does not belong to this model (None: it does). A tokenizer producing ids
    the embedding lacks, or whose end-of-text id differs from the one the run trained with, would
    make a broken export."""
    if tok.vocab_size > model_vocab:
        return (f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary is "
                f"{model_vocab}: it is not the run's tokenizer")
    if (eos_token_id is not None and tok.eos_token_id is not None
            and tok.eos_token_id != eos_token_id):
        return (f"tokenizer {tok.path} has end-of-text id {tok.eos_token_id} but the run trained "
                f"with {eos_token_id}: it is not the run's tokenizer")
    return None


def write_tokenizer(tok: TokenizerInfo, out_dir: Path, *, model_max_length: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json via transformers (what AutoTokenizer reads back).
    GPT-NeoX convention: the end-of-text token is also bos and unk; prepare.py encodes without
    special tokens, so does this tokenizer."""

    special = ({k: tok.eos_token for k in ("eos_token", "bos_token", "unk_token")} if tok.eos_token
               else {})
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok.path),
                                     model_max_length=model_max_length, **special)
    before = {p.name for p in out_dir.iterdir()}
    hf_tok.save_pretrained(str(out_dir))
    # transformers 5 records its new class name (TokenizersBackend); the older alias loads the same
    # tokenizer.json in transformers 5 and is the one transformers 4 (and other tools reading the
    # folder) know.
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return sorted({p.name for p in out_dir.iterdir()} - before)


# -- config, generation config, model card ---------------------------------------------------------


def write_configs(info: CheckpointInfo, plan: ExportPlan, out_dir: Path, *,
                  eos_token_id: int | None):
    """config.json and generation_config.json for inference: the checkpoint's config with the output
    dtype and vocabulary, and the KV cache on (training turns it off)."""

    values = dict(info.model_config)
    for key in ("_name_or_path", "transformers_version"):
        values.pop(key, None)
    config = GPTNeoXConfig.from_dict(values)
    config.vocab_size = plan.vocab_size
    config.architectures = ["GPTNeoXForCausalLM"]
    config.dtype = plan.dtype
    config.use_cache = True
    if eos_token_id is not None:
        config.eos_token_id = config.bos_token_id = eos_token_id
    config.save_pretrained(str(out_dir))
    generation = GenerationConfig.from_model_config(config)
    if config.eos_token_id is not None:
        # no pad token in GPT-NeoX vocabularies: pad with eos
        generation.pad_token_id = config.eos_token_id
    generation.save_pretrained(str(out_dir))
    return config


def final_losses(info: CheckpointInfo, *, local_save_dir: Path | None) -> dict[str, Any]:
    """The training and validation loss at (or last before) the checkpoint's step: from run.json
    when the checkpoint records them ("train_loss"/"val_loss", with "step"), else from the run's
    metrics.jsonl when that log is found."""
    step = info.step
    if info.run.get("train_loss") is not None:
        found = {"train_loss": info.run["train_loss"], "train_loss_step": step,
                 "source": "run.json"}
        if info.run.get("val_loss") is not None:
            found.update(val_loss=info.run["val_loss"],
                         val_loss_step=info.run.get("val_loss_step", step))
        return found
    log_dir = (info.run.get("run_config") or {}).get("log_dir")
    for folder in resolve_run_path(log_dir, info, local_save_dir=local_save_dir):
        path = folder / "metrics.jsonl"
        if not path.is_file():
            continue
        found: dict[str, Any] = {}
        try:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if step is not None and rec.get("step", 0) > step:
                    continue
                if rec.get("kind") == "train" and "loss" in rec:
                    found["train_loss"], found["train_loss_step"] = rec["loss"], rec["step"]
                elif rec.get("kind") == "eval" and "loss" in rec:
                    found["val_loss"], found["val_loss_step"] = rec["loss"], rec["step"]
        except (OSError, ValueError):
            continue
        if found:
            found["source"] = str(path)
            return found
    return {}


def tokens_seen(info: CheckpointInfo) -> int | None:
    samples = info.run.get("consumed_samples")
    seq_len = (info.run.get("run_config") or {}).get("seq_len")
    return int(samples) * int(seq_len) if samples is not None and seq_len else None


def write_model_card(out_dir: Path, *, name: str, info: CheckpointInfo, plan: ExportPlan,
                     source: str, weights: str, losses: dict[str, Any],
                     tokenizer: TokenizerInfo | None, verify: dict[str, Any] | None) -> None:
    run_cfg = info.run.get("run_config") or {}
    tokens = tokens_seen(info)

    def loss(kind: str) -> str:
        if f"{kind}_loss" not in losses:
            return "not recorded (the run's metrics.jsonl was not found)"
        return f"{losses[f'{kind}_loss']:.4f} (step {losses[f'{kind}_loss_step']})"

    rows = [
        ("source checkpoint", f"`{source}` tag `{info.tag}`"),
        ("training step", str(info.step) if info.step is not None else "unknown"),
        ("tokens seen", f"{tokens:,}" if tokens is not None else "unknown"),
        ("final training loss", loss("train")),
        ("validation loss", loss("val")),
        ("model preset", f"`{run_cfg.get('model', 'unknown')}`"),
        ("parameters", f"{plan.num_parameters:,}"),
        ("training", f"ZeRO-{info.stage}, {info.dp_size} rank(s), {info.precision}"),
        ("weights", f"{weights}, saved as {DTYPE_NAMES[plan.dtype]}"),
        ("vocabulary",
         f"{plan.vocab_size}" + (f" (embedding padding to {plan.padded_vocab_size} removed)"
                                 if plan.unpadded else
                                 " (padded for the embedding; the tokenizer uses fewer ids)"
                                 if tokenizer and tokenizer.vocab_size < plan.vocab_size else "")),
        ("tokenizer", "included" if tokenizer else "none recorded with the run (not included)"),
        ("verification",
         (f"logits match the DeepSpeed checkpoint: max abs diff {verify['max_abs_diff']:.3g} "
          f"(tolerance {verify['tolerance']:.3g})") if verify else "not run (`--verify`)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    usage = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")\n")
    if tokenizer:
        usage += (f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n"
                  "ids = tokenizer(\"def main():\", return_tensors=\"pt\").input_ids\n"
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))\n")
    card = (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- gpt-neox\n- "
        f"neox-train\n---\n\n# {name}\n\n"
        "A GPT-NeoX causal language model trained with neox-train (DeepSpeed) and converted with "
        f"`neox-convert-hf`.\n\n| | |\n| --- | --- |\n{table}\n\n"
        f"## Usage\n\n```python\n{usage}```\n"
    )
    (out_dir / "README.md").write_text(card)


def print_step(message: str) -> None:
    print(f"neox-convert-hf: {message}", file=sys.stderr)
