"""Everything a run needs resolved before anything expensive: validated configs, the model shape,
the data.

`prepare_run` checks the run and DeepSpeed configs and builds the model config without reading data
or building the model; `load_data` then validates and packs the shards. Both fail with one line,
before any process group, model or engine exists.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch._dynamo

from neox_train.config import RunConfig
from neox_train.data.mixture import MixtureSplit, MixtureWindows, combine, epochs_by, epochs_line
from neox_train.data.shards import (
    TOKENIZER_FILE,
    VALIDATION_CACHE,
    dataset_folder,
    discover_shards,
    read_meta,
    resolve_vocab,
    validate_shards,
)
from neox_train.data.windows import PackedWindows, Split, split_windows
from neox_train.ds_config import effective_ds_config, load_ds_config, precision, zero_stage
from neox_train.errors import ConfigError, DataError
from neox_train.log import log
from neox_train.model import (
    check_hf_init,
    flops_per_token,
    hf_config,
    padded_vocab_size,
    parameter_counts,
)


@dataclass(frozen=True)
class RunPlan:
    """Everything resolved before the engine exists: validated configs and the model shape."""

    run: RunConfig
    ds_config_path: Path
    ds_config: dict[str, Any]
    ds_notes: list[str]
    dp_size: int
    tokenizer_vocab_size: int
    model_config: Any  # transformers GPTNeoXConfig

    def describe(self) -> dict[str, Any]:
        """The `--describe` object: effective configs, parameter counts and FLOPs per token."""
        counts = parameter_counts(self.model_config)
        return {
            "run_config": self.run.to_dict(),
            "ds_config_file": str(self.ds_config_path),
            "ds_config": self.ds_config,
            "ds_config_changes": self.ds_notes,
            "data_parallel_size": self.dp_size,
            "zero_stage": zero_stage(self.ds_config),
            "precision": precision(self.ds_config),
            "model": {
                "preset": self.run.model,
                "vocab_size": self.model_config.vocab_size,
                "tokenizer_vocab_size": self.tokenizer_vocab_size,
                "hidden_size": self.model_config.hidden_size,
                "num_layers": self.model_config.num_hidden_layers,
                "num_heads": self.model_config.num_attention_heads,
                "intermediate_size": self.model_config.intermediate_size,
                "seq_len": self.run.seq_len,
            },
            "params": {"total": counts.total, "non_embedding": counts.non_embedding},
            "flops_per_token": flops_per_token(self.model_config, self.run.seq_len),
            # With activation checkpointing the layers' forward runs twice: what HFU counts (MFU
            # does not).
            "hardware_flops_per_token": flops_per_token(
                self.model_config, self.run.seq_len,
                activation_checkpointing=self.run.activation_checkpointing
            ),
            "tokens_per_step": self.ds_config["train_batch_size"] * self.run.seq_len,
        }


def prepare_run(run: RunConfig, *, dp_size: int, on_gpu: bool) -> RunPlan:
    """Resolve and validate the run without touching data contents or building the model."""
    ds_path, ds_base = load_ds_config(run.ds_config)
    ds_cfg, notes = effective_ds_config(ds_base, run, dp_size=dp_size, on_gpu=on_gpu)
    vocab, meta = resolve_vocab(run.vocab_size, run.data_paths()[0])
    eos = meta.get("eos_token_id") if meta else None
    model_cfg = hf_config(
        run.model, padded_vocab_size(vocab, run.vocab_pad_multiple), eos_token_id=eos,
        attention=run.attention
    )
    if run.attention == "flex_attention" and not on_gpu:
        raise ConfigError("attention=flex_attention needs CUDA (FlexAttention has no backward on "
                          "the CPU); use attention=sdpa here")
    if run.document_masking and eos is None:
        raise ConfigError(
            f"document_masking needs the EOS id between the packed documents, and "
            f"{run.data_paths()[0]} has no meta.json with eos_token_id (neox-data prepare writes "
            "one); turn document_masking off for this data")
    if run.compile:
        check_compile_backend(run.compile)
    if run.init_from_hf:
        check_hf_init(run.init_from_hf, model_cfg, model_name=run.model)
    return RunPlan(run, ds_path, ds_cfg, notes, dp_size, vocab, model_cfg)


def check_compile_backend(backend: str) -> None:
    """An unknown torch.compile backend fails here, not minutes later at the first forward."""

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(
            f"compile={backend!r} is not a torch.compile backend (valid: {', '.join(known)})")


def load_data(plan: RunPlan) -> tuple[PackedWindows | MixtureWindows, Split | MixtureSplit]:
    """Discover, validate (dtype, emptiness, token ids < vocab) and pack the shards of data_dir, or
    of every dataset of the mixture: fails before the engine exists."""
    run = plan.run
    if not run.data:
        windows, split, paths = _load_one(plan, run.data_dir)
        log.info("data: %d shards in %s, %d windows of %d tokens (%d train, %d validation)",
                 len(paths), run.data_dir, len(windows), run.seq_len, len(split.train),
                 len(split.val))
        return windows, split
    check_one_tokenizer([e["path"] for e in run.data])
    total = sum(float(e["weight"]) for e in run.data)
    datasets = []
    for entry in run.data:
        windows, split, paths = _load_one(plan, entry["path"])
        name = entry.get("name") or Path(entry["path"]).name
        datasets.append((name, entry["path"], float(entry["weight"]), windows, split))
        log.info("data %s: %d shards in %s, %d windows of %d tokens (%d train, %d validation), "
                 "weight %.3g",
                 name, len(paths), entry["path"], len(windows), run.seq_len, len(split.train),
                 len(split.val), float(entry["weight"]) / total)
    windows, mixture = combine(datasets)
    samples = run.max_steps * int(plan.ds_config["train_batch_size"])
    log.info("data mixture: %s", epochs_line(epochs_by(mixture, samples), run.max_steps))
    return windows, mixture


def check_one_tokenizer(paths: list[str]) -> None:
    """A mixture's datasets must share the tokenizer (the same id must mean the same token): their
    meta.json files agree on vocabulary, end-of-text id and tokenizer.json. A dataset without
    meta.json (a Megatron PREFIX) cannot be checked: one WARNING."""
    seen: dict[tuple, list[str]] = {}
    unchecked = []
    for path in paths:
        meta = read_meta(path)
        if meta is None:
            unchecked.append(path)
            continue
        tokenizer = dataset_folder(path) / str(meta.get("tokenizer") or TOKENIZER_FILE)
        digest = (hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12] if tokenizer.is_file()
                  else None)
        seen.setdefault((meta.get("vocab_size"), meta.get("eos_token_id"), digest), []).append(path)
    if len(seen) > 1:
        kinds = "; ".join(f"{', '.join(p)}: vocab {k[0]}, end-of-text {k[1]}, tokenizer.json "
                          f"{k[2] or 'none'}"
                          for k, p in seen.items())
        raise DataError(f"the mixture's datasets were tokenized differently ({kinds}): prepare "
                        f"them with one tokenizer (neox-data prepare --tokenizer FILE)")
    if unchecked and len(paths) > 1:
        log.warning("data: %s hold(s) no meta.json, so nothing shows they share the tokenizer of "
                    "the other datasets",
                    ", ".join(unchecked))


def _load_one(plan: RunPlan, data_dir: str) -> tuple[PackedWindows, Split, list[Path]]:
    run = plan.run
    paths = discover_shards(data_dir)
    if run.max_shards is not None:
        paths = paths[: run.max_shards]
    folder = dataset_folder(data_dir)  # or beside an indexed PREFIX
    shards = validate_shards(paths, plan.tokenizer_vocab_size, cache_path=folder / VALIDATION_CACHE)
    windows = PackedWindows(shards, run.seq_len)
    return windows, split_windows(len(windows), run.val_fraction), paths
