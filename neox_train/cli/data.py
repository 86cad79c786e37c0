"""`neox-data prepare` (text, jsonl or builtin:pydoc -> token shards + tokenizer) and `neox-data download`
(bucket -> local folder)."""

from __future__ import annotations

import argparse
import sys

from neox_train.cli.sync import add_download_arguments, main_download
from neox_train.data.prepare import add_prepare_arguments, main_prepare
from neox_train.errors import run_guarded


def data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neox-data", description="Prepare token shards for neox-train.")
    sub = p.add_subparsers(dest="command", required=True)
    add_prepare_arguments(sub.add_parser("prepare", help="text/jsonl (or builtin:pydoc) -> token shards + tokenizer"))
    add_download_arguments(sub.add_parser(
        "download", help="bucket (gs://...) -> local folder: skip existing, keep nested folders"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = data_parser().parse_args(argv)
    return run_guarded("neox-data", lambda: main_download(args) if args.command == "download" else main_prepare(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
