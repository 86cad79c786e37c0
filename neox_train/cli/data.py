"""`neox-data prepare` (documents -> token shards or an indexed dataset + tokenizer),
`neox-data info` (what a dataset or mixture holds) and `neox-data download` (bucket -> local
folder)."""

from __future__ import annotations

import argparse
import sys

from neox_train.cli.sync import add_download_arguments, main_download
from neox_train.data.info import add_info_arguments, info, plan_rows, print_info
from neox_train.data.prepare import add_prepare_arguments, main_prepare
from neox_train.errors import ConfigError, run_guarded


def data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neox-data",
                                description="Prepare token shards for neox-train.")
    sub = p.add_subparsers(dest="command", required=True)
    add_prepare_arguments(
        sub.add_parser("prepare", help="text/jsonl (or builtin:pydoc) -> token shards + tokenizer"))
    add_info_arguments(sub.add_parser("info", help="datasets, documents, tokens, dtypes, the "
                                                   "largest token id; with --config, each "
                                                   "dataset's share and epochs"))
    add_download_arguments(sub.add_parser(
        "download", help="bucket (gs://...) -> local folder: skip existing, keep nested folders"))
    return p


def main_info(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus} must be >= 1")
    result = info(list(args.paths))
    if args.config:
        # deferred with train.plan (~3 s: torch): only for --config
        from neox_train.config import load_run_config
        from neox_train.train.plan import load_data, prepare_run

        run = load_run_config(args.config)
        plan = prepare_run(run, dp_size=args.gpus, on_gpu=False)
        _, split = load_data(plan)
        result["plan"] = {"config": args.config, "gpus": args.gpus,
                          **plan_rows(run, split, int(plan.ds_config["train_batch_size"]))}
    return print_info(result, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    args = data_parser().parse_args(argv)
    commands = {"download": main_download, "prepare": main_prepare, "info": main_info}
    return run_guarded("neox-data", lambda: commands[args.command](args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
