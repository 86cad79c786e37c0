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
        from neox_train.train.run import run_training

        summary = run_training(run, resume=args.resume, takeover=args.takeover)
        # Stopped by SIGTERM (checkpoint saved and flushed): 128+15, so a scheduler sees a preempted job, not a
        # finished one.
        return 143 if summary.get("stopped_by_signal") else 0

    return run_guarded("neox-train", go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
