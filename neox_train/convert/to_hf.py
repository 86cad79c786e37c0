"""`neox-convert-hf`: a DeepSpeed checkpoint of a neox-train run (any ZeRO stage, any number of
ranks, local or gs://) -> a HuggingFace GPTNeoX folder that `AutoModelForCausalLM.from_pretrained`
loads, optionally proven equal to the checkpoint by running the same tokens through both
(`--verify`).

Order of work: every check that can reject the input (output folder, checkpoint layout, tag, model
config, ranks, tokenizer, vocabulary) runs before any weight is read. The folder is built in a
hidden staging folder next to --out and renamed into place only when complete (and verified, with
--verify), so --out is never half-written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.initialization import no_init_weights

from neox_train.convert import DEFAULT_MAX_SHARD_SIZE, DEFAULT_TAG
from neox_train.convert.hf_export import (
    DTYPES,
    check_tokenizer,
    final_losses,
    find_tokenizer,
    parse_shard_size,
    plan_export,
    print_step,
    tokens_seen,
    write_configs,
    write_model_card,
    write_tokenizer,
    write_weights,
)
from neox_train.convert.locate import Located, locate
from neox_train.convert.source import inspect_checkpoint
from neox_train.convert.weights import WeightSource
from neox_train.errors import ConvertError, VerifyFailed
from neox_train.remote.files import install_folder

# Logit agreement demanded by --verify, as a fraction of the largest reference logit (at least 1):
# the DeepSpeed model runs in fp32, the export in its own dtype. fp32 differs only by summation
# order (~1e-6 seen); bf16/fp16 carry 8/11 mantissa bits through every layer (~1e-2 seen on a
# 24-layer model). A wrong or missing tensor, a wrong config field or a vocabulary shift moves
# logits by the order of the logits themselves.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
VERIFY_BATCH, VERIFY_MAX_LEN, VERIFY_SEED = 2, 64, 0


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConvertError(
            f"--out {out} already exists; pass --overwrite to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file, not a folder")
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConvertError(f"--out {out}: cannot write in {parent}")


def options(checkpoint: str, out: Path, **given: Any) -> argparse.Namespace:
    """convert()'s arguments for a caller other than neox-convert-hf (neox-eval), with that
    command's defaults."""
    values = dict(checkpoint=checkpoint, out=str(out), tag=DEFAULT_TAG, dtype=None, verify=False,
                  max_shard_size=DEFAULT_MAX_SHARD_SIZE, unpad_vocab=False, tokenizer=None,
                  overwrite=False, credentials=None)
    unknown = set(given) - set(values)
    if unknown:
        raise TypeError(f"unknown conversion option(s): {', '.join(sorted(unknown))}")
    return argparse.Namespace(**{**values, **given})


def convert(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).expanduser().absolute()
    _check_out(out, args.overwrite)
    located = locate(args.checkpoint, args.tag, credentials=args.credentials,
                     scratch_parent=out.parent)
    try:
        return convert_located(args, located)
    finally:
        located.cleanup()


def convert_located(args: argparse.Namespace, located: Located) -> dict[str, Any]:
    """Export a checkpoint already on local disk (locate's result) to args.out."""
    started = time.perf_counter()
    out = Path(args.out).expanduser().absolute()
    _check_out(out, args.overwrite)
    max_shard = parse_shard_size(args.max_shard_size)
    tag_dir = located.tag_dir.resolve()
    if out == tag_dir or out in tag_dir.parents:
        raise ConvertError(
            f"--out {out} would replace the checkpoint {tag_dir} itself; choose another folder")
    info = inspect_checkpoint(located.tag_dir)
    dtype_name = args.dtype or info.precision
    print_step(f"{located.source} tag {info.tag}: ZeRO-{info.stage}, {info.dp_size} rank(s), "
               f"trained in {info.precision}, step {info.step} -> {out} ({dtype_name})")
    local_save_dir = None if located.remote else located.tag_dir.parent
    summary = _export(args, info, DTYPES[dtype_name], dtype_name, out, max_shard,
                      source=located.source, local_save_dir=local_save_dir)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    print_step(f"wrote {out} in {summary['seconds']:.1f} s")
    return summary


def _vocabulary(args, info, tokenizer) -> tuple[int | None, int | None]:
    """(output vocab size or None to keep the padding, the tokenizer's vocab size as the run knew
    it)."""

    run_cfg = info.run.get("run_config") or {}
    known = run_cfg.get("vocab_size") or (tokenizer.vocab_size if tokenizer else None)
    if not args.unpad_vocab:
        return None, known
    if known is None:
        raise ConvertError(
            "--unpad-vocab: the checkpoint does not record the tokenizer's vocabulary size and no "
            "tokenizer was found; pass --tokenizer FILE"
        )
    padded = int(info.model_config["vocab_size"])
    if known > padded:
        raise ConvertError(
            f"--unpad-vocab: the tokenizer's vocabulary ({known}) exceeds the model's ({padded})")
    return int(known), int(known)


def _export(args, info, dtype, dtype_name: str, out: Path, max_shard: int, *, source: str,
            local_save_dir: Path | None) -> dict[str, Any]:
    tokenizer = find_tokenizer(args.tokenizer, info, local_save_dir=local_save_dir)
    vocab_out, tokenizer_vocab = _vocabulary(args, info, tokenizer)
    plan = plan_export(info, dtype, vocab_out)
    if tokenizer is not None:
        problem = check_tokenizer(tokenizer, plan.vocab_size, info.model_config.get("eos_token_id"))
        if problem and tokenizer.explicit:
            raise ConvertError(problem)
        if problem:
            print_step(f"warning: {problem}; the export gets no tokenizer (pass --tokenizer FILE)")
            tokenizer = None
    else:
        print_step("no tokenizer recorded with this run (checked the tag folder and the run's "
                   "data_dir): the export has none; pass --tokenizer FILE to include one")

    source_weights = WeightSource(info).open()
    weights_from, masters = source_weights.description, source_weights.masters
    print_step(f"weights: {weights_from}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        weights = write_weights(source_weights, plan, staging, max_shard,
                                progress=sys.stderr.isatty())
        source_weights.close()
        del source_weights
        eos = info.model_config.get("eos_token_id")
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = tokenizer.eos_token_id
        write_configs(info, plan, staging, eos_token_id=eos)
        tok_files = []
        if tokenizer is not None:
            tok_files = write_tokenizer(
                tokenizer, staging,
                model_max_length=int(info.model_config["max_position_embeddings"]))
        verify = _verify(info, plan, staging, dtype_name, tokenizer_vocab) if args.verify else None
        losses = final_losses(info, local_save_dir=local_save_dir)
        write_model_card(staging, name=out.name, info=info, plan=plan, source=source,
                         weights=weights_from, losses=losses, tokenizer=tokenizer, verify=verify)
        install_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "out": str(out), "source": source, "tag": info.tag, "step": info.step,
        "zero_stage": info.stage, "dp_size": info.dp_size, "training_precision": info.precision,
        "dtype": dtype_name, "weights_from": weights_from, "fp32_masters": masters,
        "parameters": plan.num_parameters, "vocab_size": plan.vocab_size,
        "padded_vocab_size": plan.padded_vocab_size, "weight_files": weights["files"],
        "total_size": weights["total_size"],
        "tokenizer": str(tokenizer.path) if tokenizer else None, "tokenizer_files": tok_files,
        "tokens_seen": tokens_seen(info), **{k: v for k, v in losses.items() if k != "source"},
        "verify": verify,
    }


def _verify(info, plan, folder: Path, dtype_name: str,
            tokenizer_vocab: int | None) -> dict[str, Any]:
    """The same token batch through (a) GPTNeoXForCausalLM rebuilt from the DeepSpeed checkpoint in
    fp32 (a fresh read of the checkpoint, not the tensors just written) and (b) the export loaded by
    AutoModelForCausalLM."""

    reference_weights = WeightSource(info).open()
    state = {name: reference_weights.take(name, torch.float32) for name in plan.module_names}
    reference_weights.close()
    # the weights are assigned below; random init of a large model costs seconds
    with no_init_weights():
        reference = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(info.model_config))
    reference.load_state_dict(state, strict=True, assign=True)
    del state
    reference.eval()

    exported, loading = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    exported.eval()
    problems = [f"{kind}: {', '.join(sorted(keys)[:4])}" for kind, keys in loading.items()
                if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys]
    if problems:
        raise VerifyFailed(f"transformers loads {folder.name} with {'; '.join(problems)}")
    if exported.dtype != plan.dtype:
        raise VerifyFailed(f"the export loads as {exported.dtype}, expected {plan.dtype}")

    vocab = min(tokenizer_vocab or plan.vocab_size, plan.vocab_size)
    length = min(VERIFY_MAX_LEN, int(info.model_config["max_position_embeddings"]))
    ids = torch.randint(0, vocab, (VERIFY_BATCH, length),
                        generator=torch.Generator().manual_seed(VERIFY_SEED))
    with torch.no_grad():
        want = reference(input_ids=ids).logits[..., : plan.vocab_size].float()
        got = exported(input_ids=ids).logits.float()
    diff = (want - got).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    tolerance = TOLERANCE[dtype_name] * scale
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    result = {"max_abs_diff": diff, "tolerance": tolerance, "dtype": dtype_name,
              "tokens": int(ids.numel()), "argmax_agreement": agree}
    print_step(f"verify: max abs logit diff {diff:.3g} over {VERIFY_BATCH}x{length} tokens "
               f"({dtype_name} export vs fp32 checkpoint model; tolerance {tolerance:.3g}; argmax "
               f"agrees on {agree:.1%})")
    if not diff <= tolerance:  # also catches NaN
        raise VerifyFailed(f"max abs logit diff {diff:.3g} exceeds the {dtype_name} tolerance "
                           f"{tolerance:.3g}; nothing was written to the output folder")
    return result

