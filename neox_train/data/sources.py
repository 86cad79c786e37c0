"""Where `neox-data prepare` reads documents: the corpora teams have, streamed in constant memory.

An input is one of:
- `builtin:NAME`, a corpus available offline on every machine (`builtin:pydoc`, CPython's reference
  docs);
- a `.txt` file: the whole file is one document;
- JSON lines: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (the Pile's format). One object per line, the text
  under `text_key` (default "text"); blank lines are skipped;
- a `.parquet` file (FineWeb and most of the HF hub), read one row group batch at a time, column
  `text_key`;
- a folder written by HF `datasets`' `save_to_disk` (state.json + *.arrow), column `text_key`;
- a folder of any of these files, read recursively in sorted relative-path order.
Empty documents are skipped: they would add nothing but an end-of-text token.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from pydoc_data.topics import topics

from neox_train.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
FILE_SUFFIXES = (".txt", *JSONL_SUFFIXES, ".parquet")
ACCEPTED_INPUTS = ("builtin:NAME, a .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet file, a folder "
                   "saved by HF datasets (save_to_disk), or a folder of them")
_ARROW_BATCH_ROWS = 1024


def _pydoc_topics() -> Iterator[str]:
    """The Python reference documentation shipped with CPython (~465k chars): a corpus that needs no
    download."""

    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key]


BUILTIN_CORPORA: dict[str, Callable[[], Iterator[str]]] = {"pydoc": _pydoc_topics}


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _is_hf_saved(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def iter_documents(inputs: list[str], *, text_key: str = "text") -> Iterator[str]:
    """Documents from every input in order; each call starts over, so the corpus can be read
    twice."""
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
            yield from _folder_documents(path, text_key)
        elif not path.exists():
            raise DataError(f"input {path} does not exist (accepted: {ACCEPTED_INPUTS})")
        elif _kind(path):
            yield from _file_documents(path, text_key)
        else:
            raise DataError(f"input {path}: unsupported kind {path.suffix or '(no suffix)'!r} "
                            f"(accepted: {ACCEPTED_INPUTS})")


def _folder_documents(path: Path, text_key: str) -> Iterator[str]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"input {path}: a saved DatasetDict; give one split's folder (valid: "
                        f"{', '.join(str(path / s) for s in splits)})")
    if _is_hf_saved(path):
        yield from _hf_saved_documents(path, text_key)
        return
    files = sorted((p for p in path.rglob("*") if p.is_file() and _kind(p)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise DataError(f"input {path}: folder holds no {', '.join(FILE_SUFFIXES)} files (nor an "
                        f"HF save_to_disk dataset)")
    for file in files:
        yield from _file_documents(file, text_key)


def _file_documents(path: Path, text_key: str) -> Iterator[str]:
    kind = _kind(path)
    if kind == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(
                f"{path}: cannot read as UTF-8 text ({type(err).__name__}: {err})") from err
        if text.strip():
            yield text
    elif kind == ".parquet":
        yield from _parquet_documents(path, text_key)
    else:
        yield from _jsonl_documents(path, text_key)


def _open_text(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard  # deferred: only .zst inputs need it

        raw = open(path, "rb")  # noqa: SIM115 - closed with the wrapper
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True),
                                encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    line_no = 0
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column "
                                    f"{err.colno})") from err
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_no}: expected a JSON object with a string "
                                    f"{text_key!r} field (--text-key), got "
                                    f"{_describe(record, text_key)}")
                if text.strip():
                    yield text
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, EOFError) as err:
        # gzip's BadGzipFile is an OSError; zstandard raises ZstdError (a plain Exception) for a
        # damaged frame.
        raise DataError(f"{path}:{line_no + 1}: cannot read ({type(err).__name__}: {err})") from err
    except Exception as err:
        if type(err).__name__ == "ZstdError":
            raise DataError(f"{path}:{line_no + 1}: cannot decompress ({err})") from err
        raise


def _describe(record: object, key: str) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}"
    if key not in record:
        return f"keys {sorted(record)[:10]}"
    return f"{key!r} of type {type(record[key]).__name__}"


def _column_error(path: Path, key: str, names: list[str]) -> DataError:
    return DataError(f"{path}: no column {key!r} (columns: {', '.join(names) or 'none'}); give the "
                     f"text column with --text-key")


def _texts(path: Path, column, key: str) -> Iterator[str]:
    for text in column.to_pylist():
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{path}: column {key!r} holds {type(text).__name__} values; valid: strings")
        if text.strip():
            yield text


def _parquet_documents(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # deferred (~0.3 s): only Parquet inputs need it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
        raise DataError(f"{path}: cannot read as Parquet ({type(err).__name__}: {err})") from err
    names = parquet.schema_arrow.names
    if text_key not in names:
        raise _column_error(path, text_key, names)
    batches = parquet.iter_batches(batch_size=_ARROW_BATCH_ROWS, columns=[text_key])
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a damaged row group: pyarrow's ArrowInvalid / OSError
            raise DataError(
                f"{path}: cannot read a row group ({type(err).__name__}: {err})") from err
        if batch is None:
            return
        yield from _texts(path, batch.column(0), text_key)


def _hf_saved_documents(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow as pa  # deferred: only Arrow inputs need it

    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state.get("_data_files", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise DataError(f"{path / 'state.json'}: not the state.json HF datasets' save_to_disk "
                        f"writes ({type(err).__name__}: {err})") from err
    if not files:
        raise DataError(
            f"{path}: state.json lists no data files (not a complete save_to_disk folder)")
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                if text_key not in reader.schema.names:
                    raise _column_error(file, text_key, reader.schema.names)
                for batch in reader:
                    yield from _texts(file, batch.column(text_key), text_key)
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{file}: cannot read as an Arrow stream ({type(err).__name__}: {err})") from err
