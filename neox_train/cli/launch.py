"""`neox-launch`: plan, check and start neox-train on every GPU through the deepspeed launcher."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from neox_train.config import RESUME_AUTO
from neox_train.distributed import DEFAULT_MASTER_PORT
from neox_train.errors import ConfigError, run_guarded
from neox_train.flags import run_config_from_args, train_parser
from neox_train.launch import preflight
from neox_train.launch.launcher import (
    BIN,
    LAUNCHERS,
    deepspeed_command,
    exec_launcher,
    forwarded_train_args,
    make_plan,
    plan_table,
    planned_train_args,
    prepare_launch,
    resolve_resources,
    run_preflight,
    shell_line,
    write_env_file,
    write_launch_dir,
)
from neox_train.launch.planner import format_table
from neox_train.launch.supervisor import Job, Supervisor, kill_pattern


def launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # abbreviations would steal neox-train flags
        prog="neox-launch", add_help=False, allow_abbrev=False,
        description="Plan, check and launch neox-train through the deepspeed launcher. Other flags "
                    "go to neox-train (see neox-train --help).",
    )
    p.add_argument("-h", "--help", action="store_true",
                   help="show this help (and neox-train's flags) and exit")
    where = p.add_argument_group("where to run")
    where.add_argument("--gpus", type=int,
                       help="GPUs in total (single node: this machine); with --hostfile, must "
                            "equal the slots selected")
    where.add_argument("--hostfile", help="DeepSpeed hostfile: lines 'HOST slots=N', '#' comments")
    where.add_argument("--include", default="",
                       help="DeepSpeed's HOST[:SLOT,...][@HOST...]: only these hosts/slots")
    where.add_argument("--exclude", default="",
                       help="DeepSpeed's HOST[:SLOT,...][@HOST...]: all but these")
    where.add_argument("--num-nodes", type=int, help="the first N hosts of the hostfile")
    where.add_argument("--launcher", default="pdsh", choices=LAUNCHERS,
                       help="multi-node runner (default pdsh)")
    where.add_argument("--master-addr",
                       help="address of the first node for torch.distributed (default: DeepSpeed "
                            "asks the first host for `hostname -I`)")
    where.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT,
                       help="torch.distributed port")
    where.add_argument("--ssh-port", type=int, help="sshd port on the hosts, when not 22")
    where.add_argument("--no-ssh-check", action="store_true",
                       help="skip the ssh reachability and code checks (DeepSpeed's and ours)")
    plan = p.add_argument_group("memory plan")
    plan.add_argument("--zero", default="auto", choices=("auto", "0", "1", "2", "3"),
                      help="ZeRO stage: auto (the planner's choice) or force one (warns when it "
                           "will not fit)")
    plan.add_argument("--offload", action="store_true",
                      help="with --zero 2 or 3: the CPU-offload variant")
    plan.add_argument("--gpu-mem-gb", type=float,
                      help="GPU memory in GiB (default: read from the device)")
    modes = p.add_argument_group("what to do")
    modes.add_argument("--plan", action="store_true",
                       help="print the plan and exit (nothing is launched)")
    modes.add_argument("--table", action="store_true",
                       help="with --plan: a markdown table over --table-gpus x "
                            "--table-mem-gb")
    modes.add_argument("--table-gpus", default="1,2,4,8,16,64", help="GPU counts for --table")
    modes.add_argument("--table-mem-gb", default="24,40,80",
                       help="GPU memory sizes (GiB) for --table")
    modes.add_argument("--check", action="store_true",
                       help="run the pre-flight checks, print the table and exit")
    modes.add_argument("--no-check", action="store_true",
                       help="launch without the pre-flight checks")
    modes.add_argument("--dry-run", action="store_true",
                       help="write the launch folder and print the exact command instead of "
                            "running it")
    modes.add_argument("--json", action="store_true",
                       help="--plan/--check/--dry-run: one JSON object on stdout")
    heal = p.add_argument_group("self-healing")
    heal.add_argument("--max-restarts", type=int, default=0, metavar="N",
                      help="when a rank crashes, is killed or hangs: stop the whole job and start "
                           "it again from its newest complete checkpoint, up to N times (default "
                           "0: the job ends with the failure)")
    heal.add_argument("--restart-backoff-s", type=float, default=10.0, metavar="S",
                      help="seconds before the first restart, doubling for each further one (at "
                           "most 300)")
    p.add_argument("--launch-dir", metavar="DIR",
                   help="where the resolved DeepSpeed JSON, hostfile and .deepspeed_env are "
                        "written (default: SAVE_DIR/launch); every node reads the JSON, so with "
                        "node-local checkpoint storage (checkpoint.use_node_local_storage) give a "
                        "folder on a shared filesystem")
    return p


def _train_parser() -> argparse.ArgumentParser:
    parser = train_parser()
    parser.prog = "neox-launch"  # its errors then name the command the user typed
    return parser


# -- main ------------------------------------------------------------------------------------------
def _print_help() -> None:
    launch_parser().print_help()
    print("\nneox-train flags (passed on):\n")
    print(_train_parser().format_help().split("options:", 1)[-1])


def _run(argv: list[str] | None, out) -> int:
    args, rest = launch_parser().parse_known_args(argv)
    if args.help:
        with contextlib.redirect_stdout(out):
            _print_help()
        return 0
    tparser = _train_parser()
    targs = tparser.parse_args(rest)  # unknown flags: argparse's usage line and exit 2
    if targs.describe:
        raise ConfigError("--describe is neox-train's (it runs nothing): use `neox-launch --plan` "
                          "for the launch plan")
    run = run_config_from_args(targs)
    if args.plan and args.table:
        rows = plan_table(run, args)
        print(json.dumps({"rows": rows}) if args.json else format_table(rows), file=out)
        return 0

    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts} must be >= 0 (0: no restarts)")
    if args.restart_backoff_s < 0:
        raise ConfigError(
            f"--restart-backoff-s {args.restart_backoff_s:g} must be a number of seconds >= 0")
    resources = resolve_resources(args)
    req, plan = make_plan(run, args, resources)
    for warning in plan.warnings:
        print(f"neox-launch: warning: {warning}", file=sys.stderr)
    if args.plan:
        print(json.dumps(plan.to_dict()) if args.json else _plan_text(plan), file=out)
        return 0

    launch = prepare_launch(args, tparser, targs, run, resources, req, plan)
    if args.check:
        checks = run_preflight(args, launch, plan)
        print(json.dumps(preflight.as_json(checks)) if args.json
              else preflight.format_checks(checks), file=out)
        return 1 if any(c.failed for c in checks) else 0
    if not (args.dry_run or args.no_check):
        checks = run_preflight(args, launch, plan)
        print(preflight.format_checks(checks), file=sys.stderr)
        failed = [c for c in checks if c.failed]
        if failed:
            more = f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""
            raise ConfigError(f"pre-flight failed: {failed[0].name}: {failed[0].detail}; fix: "
                              f"{failed[0].fix}{more}")

    write_launch_dir(launch, plan)
    for note in launch.env_notes:
        print(f"neox-launch: {note}", file=sys.stderr)
    if args.dry_run:
        if args.json:
            print(json.dumps({"command": launch.command, "env": launch.env_file_var,
                              "launch_dir": str(launch.launch_dir), "deepspeed_env": launch.env,
                              "plan": plan.to_dict()}), file=out)
        else:
            print(shell_line(launch.command, launch.env_file_var), file=out)
        return 0
    print(f"neox-launch: {plan.reason}", file=sys.stderr)
    print(f"neox-launch: running {shell_line(launch.command, launch.env_file_var)}",
          file=sys.stderr, flush=True)
    env = {**os.environ, **launch.env_file_var, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    if args.max_restarts:
        return supervise(args, tparser, targs, launch, plan, env)
    return exec_launcher(launch.command, env)


def supervise(args, tparser, targs, launch, plan, env: dict[str, str]) -> int:
    """The job under the supervisor: restarts resume with --resume auto; each attempt's number
    reaches every rank through .deepspeed_env (the other nodes) and the environment (this one)."""
    restart_args = argparse.Namespace(**{**vars(targs), "resume": RESUME_AUTO})
    restart_command = deepspeed_command(args, launch.resources, launch.launch_dir,
                                        forwarded_train_args(tparser, restart_args)
                                        + planned_train_args(plan, launch.launch_dir))

    def env_for(attempt: int, extra: dict[str, str]) -> dict[str, str]:
        write_env_file(launch.launch_dir, {**launch.env, **extra})
        return {**env, **extra}

    job = Job(command_for=lambda n: launch.command if n == 0 else restart_command, env_for=env_for,
              launch_dir=launch.launch_dir,
              kill_pattern=kill_pattern(launch.launch_dir / "ds_config.json"),
              hosts=launch.resources.hosts, launcher=args.launcher, ssh_port=args.ssh_port)
    return Supervisor(job, max_restarts=args.max_restarts, backoff_s=args.restart_backoff_s,
                      preemption_grace_s=launch.run.preemption_grace_s).run()


def _plan_text(plan) -> str:
    d = plan.to_dict()
    lines = [
        f"ZeRO-{d['zero_stage']} (offload: {d['offload']}; DeepSpeed JSON from {d['ds_config']}), "
        f"activation checkpointing {'on' if d['activation_checkpointing'] else 'off'}",
        f"batch: micro {d['micro_batch']} x accumulation {d['grad_accum']} x {d['gpus']} GPUs = "
        f"{d['train_batch']} sequences of {d['model']['seq_len']} tokens",
        f"estimate: {d['est_gb_per_gpu']} GiB per GPU {d['est_breakdown_gb']}"
        + (f" of {d['usable_gb_per_gpu']} usable" if d["usable_gb_per_gpu"] is not None else ""),
        f"why: {d['reason']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def go() -> int:
        # DeepSpeed's logger writes to stdout (its accelerator notice on import, for one): stdout is
        # kept for what this command prints itself, so `--json` output stays one parseable object.
        out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return _run(argv, out=out)

    try:
        return run_guarded("neox-launch", go)
    except SystemExit as e:  # argparse: usage line already printed (exit 2), or --help
        return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
