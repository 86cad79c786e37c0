"""`neox-train`: parse the flags, build the run config, train (or `--describe` it)."""

from __future__ import annotations

import json
import sys

from neox_train.errors import run_guarded
from neox_train.flags import run_config_from_args, train_parser


def main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)

    def go() -> int:
        run = run_config_from_args(args)
        # Deferred: torch, transformers and deepspeed (~3 s) load only once the flags and the run config passed, so
        # a typo fails at once.
        import torch

        from neox_train.distributed import world_size_from_env
        from neox_train.train.plan import prepare_run

        if args.describe:  # stdout is the JSON alone: deepspeed, which prints as it loads, is not imported
            plan = prepare_run(run, dp_size=world_size_from_env(), on_gpu=torch.cuda.is_available())
            print(json.dumps(plan.describe(), indent=2))
            return 0
        from neox_train.train.run import exit_code, run_training

        return exit_code(run_training(run, resume=args.resume, takeover=args.takeover))

    try:
        return run_guarded("neox-train", go)
    except KeyboardInterrupt:  # Ctrl-C before the loop's handlers (start-up) or after them: nothing to save
        print("neox-train: interrupted (Ctrl-C) before training began or after it ended: nothing new was saved; the "
              "checkpoints already in the save dir are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
