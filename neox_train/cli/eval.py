"""`neox-eval`: lm-evaluation-harness on neox-train checkpoints, one or every one of a run as it
appears (--watch), results under eval/ beside the tags and in the run's trackers."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from neox_train.config_rules import TRACKERS
from neox_train.errors import ConfigError, NeoxError, one_line, run_guarded
from neox_train.eval.harness import DEFAULT_TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neox-eval",
        description="Evaluate neox-train checkpoints with lm-evaluation-harness. Results go to "
                    "eval/TAG/TASK.json beside the run's tags (never inside one) and to the run's "
                    "trackers at the checkpoint's step.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                   help="a run's save dir or a published gs://bucket/prefix (file:// or a "
                        "published folder too): its newest complete checkpoint, or --tag")
    p.add_argument("--watch", metavar="URL",
                   help="evaluate every complete checkpoint of the run at URL (save dir or "
                        "published prefix) as it appears, skipping those already evaluated; stops "
                        "after the run's final checkpoint, or on Ctrl-C")
    p.add_argument("--once", action="store_true",
                   help="with --watch: evaluate what is complete now, then exit")
    p.add_argument("--interval", type=float, default=60.0, metavar="S",
                   help="with --watch: seconds between looks for new checkpoints (default 60)")
    p.add_argument("--tag", metavar="TAG", help="the checkpoint to evaluate (default: latest)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), metavar="LIST",
                   help="comma-separated lm-eval tasks, groups or tags (default: the Pythia "
                        f"paper's zero-shot set: {','.join(DEFAULT_TASKS)})")
    p.add_argument("--include-path", metavar="DIR",
                   help="a folder of lm-eval task YAMLs (your own tasks, local data)")
    p.add_argument("--device", default=None,
                   help="torch device for the model (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", default=None, metavar="N|auto",
                   help="lm-eval batch size (default: auto on cuda, 8 on cpu)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="only the first N examples of each task (a quick look, not a result)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the converted model (default: the run's training precision)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer.json for a run that recorded none (default: the checkpoint's "
                        "or its run's data_dir's)")
    p.add_argument("--keep-hf", metavar="DIR",
                   help="keep each converted HuggingFace folder as DIR/TAG (default: scratch, "
                        "removed after its evaluation)")
    p.add_argument("--report-to", metavar="LIST",
                   help=f"trackers to log results to: {', '.join(TRACKERS)} or none (default: "
                        "the run's own report_to)")
    p.add_argument("--log-dir", metavar="DIR",
                   help="where TensorBoard events, W&B files and the default MLflow store are "
                        "(default: the run's log_dir)")
    p.add_argument("--credentials", metavar="FILE",
                   help="service-account JSON for gs:// (default: GOOGLE_APPLICATION_CREDENTIALS)")
    p.add_argument("--json", action="store_true",
                   help="print a summary as one JSON object on stdout")
    return p


def _settings(args: argparse.Namespace):
    # Deferred: torch and lm_eval load only after the flags parsed (--help stays instant).
    import torch

    from neox_train.config_rules import tracker_names
    from neox_train.eval.evaluate import EvalSettings
    from neox_train.track.trackers import check_installed

    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    if not tasks:
        raise ConfigError(f"--tasks {args.tasks!r} names no task (valid: comma-separated lm-eval "
                          "task names)")
    if args.report_to is not None and tracker_names(args.report_to) is None:
        raise ConfigError(f"--report-to {args.report_to!r} is not valid (valid: a comma-separated "
                          f"list of {', '.join(TRACKERS)}, or none)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit} must be >= 1")
    if args.interval <= 0:
        raise ConfigError(f"--interval {args.interval} must be > 0 seconds")
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    batch = args.batch_size or ("auto" if device.startswith("cuda") else "8")
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        raise ConfigError(f"--batch-size {batch!r} must be a number > 0 or auto")
    if args.report_to is not None:
        check_installed(tracker_names(args.report_to), what="--report-to")
    return EvalSettings(tasks=tasks, include_path=args.include_path, device=device,
                        batch_size=batch, limit=args.limit, dtype=args.dtype,
                        tokenizer=args.tokenizer, credentials=args.credentials,
                        keep_hf=Path(args.keep_hf).absolute() if args.keep_hf else None,
                        report_to=args.report_to, log_dir=args.log_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.checkpoint is None) == (args.watch is None):
        print("neox-eval: error: give a CHECKPOINT or --watch URL (one of them)", file=sys.stderr)
        return 2
    if args.watch and args.tag:
        print("neox-eval: error: --tag names one checkpoint; --watch evaluates each of the run's",
              file=sys.stderr)
        return 2
    stop = {"asked": False}

    def on_signal(number, _frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print(f"neox-eval: {signal.Signals(number).name}: stopping after this checkpoint (again: "
              "at once; what is stored stays)", file=sys.stderr, flush=True)

    def go() -> int:
        # deferred: torch, transformers and the storage clients load once the flags parsed
        from neox_train.eval import harness
        from neox_train.eval.evaluate import Evaluator, watch
        from neox_train.eval.results import Location

        settings = _settings(args)
        # both before any checkpoint is read: where they are (a folder's existence, a gs://
        # client), then the task names
        location = Location.open(args.watch or args.checkpoint, credentials=args.credentials)
        manager = harness.task_manager(settings.tasks, settings.include_path)
        settings.tasks = harness.expand_tags(settings.tasks, manager)
        evaluator = Evaluator(location, settings, manager)
        errors: dict[str, str] = {}
        try:
            if args.watch:
                for number in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(number, on_signal)
                tags, errors = watch(evaluator, once=args.once, interval_s=args.interval,
                                     stopping=lambda: stop["asked"])
            else:
                # SIGTERM as Ctrl-C: the fetched checkpoint and scratch folder are removed
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                tag = args.tag or _latest(location)
                tags = _one(evaluator, tag, errors)
        finally:
            trackers = evaluator.close()
        if args.json:
            print(json.dumps({"evaluated": tags, "failed": errors, "tasks": settings.tasks,
                              "results": f"{location.source.rstrip('/')}/eval",
                              "trackers": trackers}))
        return 1 if errors else 0

    try:
        return run_guarded("neox-eval", go)
    except KeyboardInterrupt:
        print("neox-eval: stopped; stored results stay (the same command continues)",
              file=sys.stderr)
        return 130


def _one(evaluator, tag: str, errors: dict[str, str]) -> list[str]:
    """Evaluate one checkpoint; a failure of lm-eval or the model is one line (bad input is a
    NeoxError, with its own line and status)."""
    try:
        if evaluator.evaluate(tag) is None:
            print(f"neox-eval: {tag} already has results for every task (eval/{tag}/)",
                  file=sys.stderr)
            return []
        return [tag]
    except NeoxError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval's and transformers' own failures
        errors[tag] = one_line(e)
        print(f"neox-eval: {tag}: failed: {errors[tag]}", file=sys.stderr)
        return []


def _latest(location) -> str:
    tags = location.complete_tags()
    if not tags:
        raise ConfigError(f"{location.source} holds no complete checkpoint (a checkpoint counts "
                          "once its completeness marker, or COMPLETE when published, exists)")
    return tags[-1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
