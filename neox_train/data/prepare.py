"""`neox-data prepare`: text / JSON-lines documents -> a byte-level BPE tokenizer -> uint16/uint32 token shards.

The output folder is exactly what training reads: shard_00000.npy, shard_00001.npy, ... (documents
concatenated, each followed by the end-of-text token), tokenizer.json, and meta.json. meta.json is written
last, so its presence means a prepare finished; training takes the vocabulary size from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from neox_train.data.shards import EOS_CANDIDATES, META_FILE, TOKENIZER_FILE
from neox_train.errors import DataError

SPECIAL_TOKENS = ("<|endoftext|>",)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte must be a token, or byte-level BPE cannot encode all text
SHARD_PATTERN = re.compile(r"shard_\d{5,}\.npy")
TEXT_SUFFIXES = (".txt", ".jsonl")
ACCEPTED_INPUTS = "builtin:NAME, a .txt file, a .jsonl file, or a directory of them"

# Documents handed to encode_batch at once: large enough for the Rust side to use every core, small enough
# that a batch of long documents does not hold gigabytes of Encoding objects.
_ENCODE_BATCH_DOCS = 1000


def _pydoc_topics() -> Iterator[str]:
    """The Python reference documentation shipped with CPython (~465k chars): a corpus that needs no download."""

    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key]


# "builtin:NAME" inputs: corpora available offline on every machine, for smoke tests and demos.
BUILTIN_CORPORA: dict[str, Callable[[], Iterator[str]]] = {"pydoc": _pydoc_topics}


@dataclass(frozen=True)
class PrepareResult:
    output_dir: Path
    tokenizer_path: Path
    vocab_size: int
    num_documents: int
    num_tokens: int
    shards: list[Path]
    seconds: float


def iter_documents(inputs: list[str]) -> Iterator[str]:
    """Documents from every input in order; each call starts over, so the corpus can be read twice.

    An input is "builtin:NAME"; a .txt file (the whole file is one document); a .jsonl file (one JSON object
    per line with a string "text" field, blank lines skipped); or a directory, whose .txt/.jsonl files are
    read recursively in sorted relative-path order. Empty documents are skipped: they would add nothing
    but an end-of-text token.
    """
    for spec in inputs:
        if spec.startswith("builtin:"):
            name = spec.removeprefix("builtin:")
            if name not in BUILTIN_CORPORA:
                valid = ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA)
                raise DataError(f"input {spec}: unknown builtin corpus (valid: {valid})")
            yield from BUILTIN_CORPORA[name]()
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(
                (p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not files:
                raise DataError(f"input {path}: directory holds no .txt or .jsonl files")
            for file in files:
                yield from _file_documents(file)
        elif not path.exists():
            raise DataError(f"input {path} does not exist (accepted: {ACCEPTED_INPUTS})")
        elif path.suffix.lower() in TEXT_SUFFIXES:
            yield from _file_documents(path)
        else:
            kind = path.suffix or "(no suffix)"
            raise DataError(f"input {path}: unsupported kind {kind!r} (accepted: {ACCEPTED_INPUTS})")


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix.lower() == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read as UTF-8 text ({type(err).__name__}: {err})") from err
        if text.strip():
            yield text
        return
    line_no = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from err
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f'{path}:{line_no}: expected a JSON object with a string "text" field, '
                        f"got {_describe(record)}"
                    )
                if text.strip():
                    yield text
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}:{line_no + 1}: cannot read as UTF-8 text ({type(err).__name__})") from err


def _describe(record: object) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}"
    if "text" not in record:
        return f"keys {sorted(record)[:10]}"
    return f'"text" of type {type(record["text"]).__name__}'


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with "<|endoftext|>" as id 0.

    The full byte alphabet is seeded, so any UTF-8 text can be encoded even if some bytes never occur in the
    training corpus. BPE training in `tokenizers` breaks count ties deterministically, so the same documents
    give the same tokenizer.json.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}")
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
    raise DataError(f"{source}: tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for both missing and malformed files
        reason = " ".join(str(err).split())
        raise DataError(f"{path}: cannot load tokenizer ({reason}); expected a Hugging Face tokenizer.json") from err


def _progress(documents: Iterable[str], desc: str, enabled: bool) -> Iterable[str]:
    if not enabled:
        return documents
    return tqdm(documents, desc=desc, unit="doc", file=sys.stderr)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Cuts a stream of token arrays into shard files of exactly shard_tokens tokens (the last one shorter)."""

    def __init__(self, output_dir: Path, shard_tokens: int, dtype: np.dtype):
        self.output_dir = output_dir
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.shards: list[Path] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self._pending_tokens)
            self._pending.append(tokens[:take])
            self._pending_tokens += take
            tokens = tokens[take:]
            if self._pending_tokens == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self._pending_tokens:
            return
        path = self.output_dir / f"shard_{len(self.shards):05d}.npy"
        np.save(path, np.concatenate(self._pending).astype(self.dtype, copy=False))
        self.shards.append(path)
        self._pending, self._pending_tokens = [], 0


def _remove_previous_output(output_dir: Path) -> None:
    """Delete shards and meta.json from an earlier prepare here, so a smaller re-run leaves no stale shard.

    Only files prepare itself writes are touched (shard_NNNNN.npy, meta.json); anything else stays.
    """
    for path in output_dir.iterdir():
        if path.is_file() and (SHARD_PATTERN.fullmatch(path.name) or path.name == META_FILE):
            path.unlink()


def prepare(
    inputs: list[str],
    output_dir: Path,
    *,
    tokenizer_path: Path | None = None,
    vocab_size: int = 8192,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize `inputs` into OUTPUT/shard_NNNNN.npy + tokenizer.json + meta.json.

    Without tokenizer_path a BPE tokenizer of vocab_size is trained on the same documents first (a second pass
    over the inputs); with it, that tokenizer is used as is (vocab_size is ignored) and copied next to the
    shards, so the folder is self-contained. Tokens are encoded without the tokenizer's own special-token
    template (no BOS), and the end-of-text id is appended after every document.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Everything is written to a staging folder first and moved in only when the whole input was tokenized, so
    # a bad document halfway through leaves the previous shards, tokenizer and meta.json untouched.
    staging = output_dir / ".prepare-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        result = _prepare_into(inputs, staging, tokenizer_path, vocab_size, shard_tokens, progress)
        _remove_previous_output(output_dir)
        shards = []
        for shard in result["shards"]:
            os.replace(staging / shard, output_dir / shard)
            shards.append(output_dir / shard)
        os.replace(staging / TOKENIZER_FILE, output_dir / TOKENIZER_FILE)
        os.replace(staging / META_FILE, output_dir / META_FILE)  # last: meta.json present == prepare finished
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PrepareResult(
        output_dir=output_dir,
        tokenizer_path=output_dir / TOKENIZER_FILE,
        vocab_size=result["vocab_size"],
        num_documents=result["num_documents"],
        num_tokens=result["num_tokens"],
        shards=shards,
        seconds=time.perf_counter() - started,
    )


def _prepare_into(
    inputs: list[str], staging: Path, tokenizer_path: Path | None, vocab_size: int, shard_tokens: int, progress: bool
) -> dict:
    """Tokenizer, shards and meta.json into `staging`; returns the meta dict."""
    out_tokenizer = staging / TOKENIZER_FILE
    if tokenizer_path is None:
        tokenizer = train_tokenizer(_progress(iter_documents(inputs), "train tokenizer", progress), vocab_size)
        tokenizer.save(str(out_tokenizer))
        source = out_tokenizer
    else:
        source = Path(tokenizer_path)
        tokenizer = _load_tokenizer(source)
        shutil.copyfile(source, out_tokenizer)
    eos_id = _eos_id(tokenizer, source)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

    writer = _ShardWriter(staging, shard_tokens, dtype)
    num_documents = num_tokens = 0
    eos = np.array([eos_id], dtype=np.int64)
    for batch in _batched(_progress(iter_documents(inputs), "tokenize", progress), _ENCODE_BATCH_DOCS):
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        ids = np.concatenate([part for enc in encodings for part in (np.asarray(enc.ids, dtype=np.int64), eos)])
        writer.add(ids)
        num_documents += len(batch)
        num_tokens += ids.size
    writer.flush()
    if num_documents == 0:
        raise DataError(f"inputs {inputs} hold no non-empty documents; nothing to tokenize")

    meta = {
        "vocab_size": vocab,
        "tokenizer": TOKENIZER_FILE,
        "eos_token_id": eos_id,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "dtype": dtype.name,
        "shards": [p.name for p in writer.shards],
        "inputs": list(inputs),
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _vocab_size_arg(text: str) -> int:
    value = _positive_int_arg(text)
    if value < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {value}")
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
                        help=f"documents: {ACCEPTED_INPUTS} (builtin: {', '.join(BUILTIN_CORPORA)})")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for shard_*.npy, tokenizer.json and meta.json")
    parser.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training one")
    parser.add_argument("--vocab-size", type=_vocab_size_arg, default=8192, metavar="N",
                        help="BPE vocabulary to train (default 8192; ignored with --tokenizer)")
    parser.add_argument("--shard-tokens", type=_positive_int_arg, default=50_000_000, metavar="N",
                        help="max tokens per shard file (default 50000000)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def main_prepare(args: argparse.Namespace) -> int:
    """Run prepare from parsed CLI args; summary on stderr (and as JSON on stdout with --json)."""
    result = prepare(
        list(args.input),
        Path(args.output),
        tokenizer_path=Path(args.tokenizer) if args.tokenizer else None,
        vocab_size=args.vocab_size,
        shard_tokens=args.shard_tokens,
        progress=sys.stderr.isatty(),
    )
    print(
        f"prepared {result.num_documents:,} documents -> {result.num_tokens:,} tokens in {len(result.shards)} "
        f"shard(s) under {result.output_dir} (vocab {result.vocab_size}, {result.seconds:.1f}s)",
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
