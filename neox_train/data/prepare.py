"""`neox-data prepare`: documents (data.sources: text, JSON lines plain/gz/zst, Parquet, HF
save_to_disk) -> a byte-level BPE tokenizer -> token shards, or one gpt-neox/Megatron indexed
dataset (`--format indexed`).

The output folder is exactly what training reads: shard_00000.npy, shard_00001.npy, ... or
data.bin + data.idx (documents concatenated, each followed by the end-of-text token),
tokenizer.json, and meta.json. meta.json is written last, so its presence means a prepare finished;
training takes the vocabulary size from it.

Tokenization runs in `--workers` processes (data.encode), in order: the same input gives
byte-identical output whatever the worker count. Everything is written into OUTPUT/.prepare-staging
first; an interrupted prepare (killed, out of time) continues from its last checkpoint there
(data.prepare_resume, data.writers) when run again with the same inputs, tokenizer and options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from neox_train.data.encode import Encoder
from neox_train.data.indexed import dtype_for_vocab
from neox_train.data.prepare_resume import (
    Options,
    finished,
    resume_state,
    signature_of,
    write_progress,
)
from neox_train.data.shards import EOS_CANDIDATES, META_FILE, TOKENIZER_FILE
from neox_train.data.sources import ACCEPTED_INPUTS, BUILTIN_CORPORA, iter_documents
from neox_train.data.writers import SHARD_PATTERN, ResumableIndexedWriter, ShardWriter
from neox_train.errors import DataError

SPECIAL_TOKENS = ("<|endoftext|>",)
# every byte must be a token, or byte-level BPE cannot encode all text
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
FORMATS = ("shards", "indexed")
# testing aid: seconds of sleep after every batch (inert unless set)
SLOW_ENV = "NEOX_PREPARE_SLOW_S"

# Documents handed to encode_batch at once: large enough for the Rust side to use every core, small
# enough that a batch of long documents does not hold gigabytes of Encoding objects.
_ENCODE_BATCH_DOCS = 1000
# and at most this much text: 2N batches in flight stay bounded for long documents
_ENCODE_BATCH_CHARS = 4_000_000


@dataclass(frozen=True)
class PrepareResult:
    output_dir: Path
    tokenizer_path: Path
    vocab_size: int
    num_documents: int
    num_tokens: int
    shards: list[Path]
    seconds: float
    format: str = "shards"
    resumed_documents: int = 0  # documents an interrupted earlier prepare had already done


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with "<|endoftext|>" as id 0.

    The full byte alphabet is seeded, so any UTF-8 text can be encoded even if some bytes never
    occur in the training corpus. BPE training in `tokenizers` breaks count ties deterministically,
    so the same documents give the same tokenizer.json.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def _eos_id(tokenizer: Tokenizer, source: Path) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"{source}: tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    # the Rust side raises a bare Exception for both missing and malformed files
    except Exception as err:
        reason = " ".join(str(err).split())
        raise DataError(f"{path}: cannot load tokenizer ({reason}); expected a Hugging Face "
                        "tokenizer.json") from err


def _progress(documents: Iterable[str], desc: str, enabled: bool) -> Iterable[str]:
    if not enabled:
        return documents
    return tqdm(documents, desc=desc, unit="doc", file=sys.stderr)


def _batched(items: Iterable[str], size: int,
             chars: int = _ENCODE_BATCH_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    held = 0
    for item in items:
        batch.append(item)
        held += len(item)
        if len(batch) == size or held >= chars:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _remove_previous_output(output_dir: Path, keep: set[str] = frozenset()) -> None:
    """Delete what an earlier prepare wrote here (shards, data.bin/.idx, meta.json), so a smaller
    re-run leaves nothing stale; `keep`: files this prepare already moved in. Anything else
    stays."""
    for path in output_dir.iterdir():
        ours = (SHARD_PATTERN.fullmatch(path.name)
                or path.name in (META_FILE, "data.bin", "data.idx"))
        if path.is_file() and ours and path.name not in keep:
            path.unlink()


def prepare(
    inputs: list[str],
    output_dir: Path,
    *,
    tokenizer_path: Path | None = None,
    vocab_size: int = 8192,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
    format: str = "shards",
    text_key: str = "text",
    workers: int = 1,
) -> PrepareResult:
    """Tokenize `inputs` into OUTPUT/shard_NNNNN.npy (or data.bin/.idx) + tokenizer.json +
    meta.json.

    Without tokenizer_path a BPE tokenizer of vocab_size is trained on the same documents first (a
    second pass over the inputs); with it, that tokenizer is used as is (vocab_size is ignored) and
    copied next to the output, so the folder is self-contained. Tokens are encoded without the
    tokenizer's own special-token template (no BOS), and the end-of-text id is appended after every
    document.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    opts = Options(tuple(inputs), Path(tokenizer_path) if tokenizer_path else None, vocab_size,
                   shard_tokens, format, text_key, workers, progress)
    # Everything is written to a staging folder first and moved in only when the whole input was
    # tokenized, so a bad document halfway through leaves the previous output untouched. An
    # interruption leaves the staging folder for the next run to continue from.
    staging = output_dir / ".prepare-staging"
    staging.mkdir(exist_ok=True)
    try:
        signature = signature_of(opts)
        meta = finished(staging, signature) or _prepare_into(opts, staging, signature)
    except DataError:
        # bad input fails the same way again: nothing to resume
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The move, restartable: a kill halfway leaves progress "finished", and the next run only
    # completes it.
    _remove_previous_output(output_dir,
                            keep=set(meta["files"]) - {p.name for p in staging.iterdir()})
    outputs = []
    for name in meta["files"]:
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)
        outputs.append(output_dir / name)
    os.replace(staging / TOKENIZER_FILE, output_dir / TOKENIZER_FILE)
    # last: meta.json present == prepare finished
    os.replace(staging / META_FILE, output_dir / META_FILE)
    shutil.rmtree(staging, ignore_errors=True)
    return PrepareResult(
        output_dir=output_dir, tokenizer_path=output_dir / TOKENIZER_FILE,
        vocab_size=meta["vocab_size"], num_documents=meta["num_documents"],
        num_tokens=meta["num_tokens"], shards=outputs, seconds=time.perf_counter() - started,
        format=format, resumed_documents=meta["resumed_documents"])


def _prepare_into(opts: Options, staging: Path, signature: str) -> dict:
    """Tokenizer, output files and meta.json into `staging`; returns the meta dict."""
    state = resume_state(staging, signature)
    out_tokenizer = staging / TOKENIZER_FILE
    if state is None:
        if opts.tokenizer_path is None:
            docs = _progress(iter_documents(list(opts.inputs), text_key=opts.text_key),
                             "train tokenizer", opts.progress)
            train_tokenizer(docs, opts.vocab_size).save(str(out_tokenizer))
        else:
            _load_tokenizer(opts.tokenizer_path)  # a bad file fails here, with its name
            shutil.copyfile(opts.tokenizer_path, out_tokenizer)
    source = opts.tokenizer_path or out_tokenizer
    tokenizer = _load_tokenizer(out_tokenizer)
    eos_id = _eos_id(tokenizer, source)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32) if opts.format == "shards" else \
        dtype_for_vocab(vocab)
    state = state or {"signature": signature, "documents": 0, "carry": 0, "writer": None}
    resumed = int(state["documents"])
    if resumed:
        print(f"neox-data: continuing an interrupted prepare: {resumed:,} documents already done",
              file=sys.stderr)
    writer = (ShardWriter(staging, opts.shard_tokens, dtype, state["writer"])
              if opts.format == "shards"
              else ResumableIndexedWriter(staging, dtype, state["writer"]))
    write_progress(staging, {**state, "writer": writer.state()})
    num_documents = _tokenize(opts, out_tokenizer, eos_id, writer, staging, state)
    if num_documents == 0:
        raise DataError(
            f"inputs {list(opts.inputs)} hold no non-empty documents; nothing to tokenize")
    files = writer.finish()
    meta = {"vocab_size": vocab, "tokenizer": TOKENIZER_FILE, "eos_token_id": eos_id,
            "num_tokens": writer.durable_tokens, "num_documents": num_documents,
            "dtype": dtype.name, "format": opts.format, "files": files, "inputs": list(opts.inputs),
            "text_key": opts.text_key}
    if opts.format == "shards":
        meta["shards"] = files
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_progress(staging, {"signature": signature, "documents": num_documents, "finished": True})
    return {**meta, "resumed_documents": resumed}


def _tokenize(opts: Options, tokenizer_path: Path, eos_id: int, writer, staging: Path,
              state: dict) -> int:
    """Encode the documents after the checkpoint into `writer`, checkpointing as it goes; the
    documents in all."""
    skip, carry = int(state["documents"]), int(state["carry"])
    docs = iter_documents(list(opts.inputs), text_key=opts.text_key)
    for _ in range(skip):  # done before the interruption: read, not encoded again
        if next(docs, None) is None:
            raise DataError(f"inputs {list(opts.inputs)} hold fewer documents than the interrupted "
                            f"prepare did; remove {staging} to start over")
    encoder = Encoder(tokenizer_path, eos_id, opts.workers)
    # a testing aid: time for a kill between checkpoints
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)
    bar = tqdm(desc="tokenize", unit="doc", file=sys.stderr, disable=not opts.progress,
               initial=skip, dynamic_ncols=True, mininterval=1.0)
    # absolute stream offsets
    done, tokens_total, started = skip, writer.durable_tokens, time.perf_counter()
    try:
        for tokens, lengths in encoder.map(_batched(docs, _ENCODE_BATCH_DOCS)):
            if carry:  # the first document's first tokens are in the last finished shard already
                tokens, lengths = tokens[carry:], lengths.copy()
                lengths[0] -= carry
                carry = 0
            ends = tokens_total + np.cumsum(lengths)
            writer.add(tokens, lengths)
            tokens_total = int(ends[-1]) if ends.size else tokens_total
            done += int(lengths.size)
            bar.update(int(lengths.size))
            rate = (tokens_total - state.get("tokens", 0)) / (time.perf_counter() - started)
            bar.set_postfix(tok_s=f"{rate:.3g}")
            if writer.checkpoint_due:
                durable = writer.durable_tokens
                # documents that end inside it
                whole = int(np.searchsorted(ends, durable, side="right"))
                before = int(ends[whole - 1]) if whole else tokens_total - int(lengths.sum())
                write_progress(staging, {"signature": state["signature"],
                                          "documents": done - lengths.size + whole,
                                          "carry": durable - before, "tokens": durable,
                                          "writer": writer.state()})
            if slow:
                time.sleep(slow)
    finally:
        encoder.close()
        bar.close()
    return done


def _vocab_size_arg(text: str) -> int:
    value = _positive_int_arg(text)
    if value < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {value}")
    return value


def _positive_int_arg(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The `neox-data prepare` options, kept next to the code they drive."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=f"documents: {ACCEPTED_INPUTS} "
                             f"(builtin: {', '.join(BUILTIN_CORPORA)})")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for shard_*.npy (or data.bin/.idx), tokenizer.json and "
                             "meta.json")
    parser.add_argument("--format", choices=FORMATS, default="shards",
                        help="shards: our .npy shards (default); indexed: one gpt-neox/Megatron "
                             "data.bin + data.idx")
    parser.add_argument("--text-key", default="text", metavar="KEY",
                        help="the text field of JSON lines, the text column of Parquet / HF "
                             "datasets (default text)")
    parser.add_argument("--workers", type=_positive_int_arg, default=len(os.sched_getaffinity(0)),
                        metavar="N",
                        help="tokenizer processes (default: one per core); the output is the same "
                             "for any N")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="use this tokenizer.json instead of training one")
    parser.add_argument("--vocab-size", type=_vocab_size_arg, default=8192, metavar="N",
                        help="BPE vocabulary to train (default 8192; ignored with --tokenizer)")
    parser.add_argument("--shard-tokens", type=_positive_int_arg, default=50_000_000, metavar="N",
                        help="max tokens per shard file (default 50000000)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on stdout")


def main_prepare(args: argparse.Namespace) -> int:
    """Run prepare from parsed CLI args; summary on stderr (and as JSON on stdout with --json)."""
    result = prepare(
        list(args.input),
        Path(args.output),
        tokenizer_path=Path(args.tokenizer) if args.tokenizer else None,
        vocab_size=args.vocab_size,
        shard_tokens=args.shard_tokens,
        progress=sys.stderr.isatty(),
        format=args.format,
        text_key=args.text_key,
        workers=args.workers,
    )
    resumed = (f", continuing after {result.resumed_documents:,} documents"
               if result.resumed_documents else "")
    print(
        f"prepared {result.num_documents:,} documents -> {result.num_tokens:,} tokens in "
        f"{len(result.shards)} file(s) under {result.output_dir} ({result.format}, vocab "
        f"{result.vocab_size}, {result.seconds:.1f}s{resumed})",
        file=sys.stderr,
    )
    if args.json:
        summary = asdict(result)
        summary.update(
            output_dir=str(result.output_dir),
            tokenizer_path=str(result.tokenizer_path),
            shards=[str(p) for p in result.shards],
        )
        print(json.dumps(summary))
    return 0
