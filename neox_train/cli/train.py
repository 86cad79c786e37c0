"""`neox-train`: parse the flags, build the run config, train (or `--describe` it)."""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import NoReturn

from neox_train.errors import run_guarded
from neox_train.flags import run_config_from_args, train_parser


def main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)

    def go() -> int:
        run = run_config_from_args(args)
        # Deferred: torch, transformers and deepspeed (~3 s) load only once the flags and the run
        # config passed, so a typo fails at once.
        import torch

        from neox_train.distributed import world_size_from_env
        from neox_train.train.plan import prepare_run

        # stdout is the JSON alone: deepspeed, which prints as it loads, is not imported
        if args.describe:
            plan = prepare_run(run, dp_size=world_size_from_env(), on_gpu=torch.cuda.is_available())
            print(json.dumps(plan.describe(), indent=2))
            return 0
        from neox_train.train.run import exit_code, run_training

        return exit_code(run_training(run, resume=args.resume, takeover=args.takeover))

    try:
        return run_guarded("neox-train", go)
    # Ctrl-C before the loop's handlers (start-up) or after them: nothing to save
    except KeyboardInterrupt:
        print("neox-train: interrupted (Ctrl-C) before training began or after it ended: nothing "
              "new was saved; the checkpoints already in the save dir are intact", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The console script: main(), then an exit that skips the interpreter's teardown.

    Once main() returns, everything a run owns is closed: checkpoints committed, uploads flushed
    and the upload process stopped, metrics and TensorBoard files closed. What is left is freeing
    the module graph of torch, transformers and DeepSpeed object by object, which every rank of
    every start pays (docs/testing.md has the measurement) and a known place for hangs in
    distributed teardown. The exit handlers still run (logging
    flushes its files, multiprocessing reaps its children); only that teardown is skipped.
    """
    code = main()
    try:
        # What interpreter exit runs first (a CPython function since 3.0, though undocumented).
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # a reader gone (a closed pipe): nothing left to say to it
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
