"""`neox-launch`: plan the ZeRO stage for the GPUs at hand, check the setup, and start `neox-train`
through the `deepspeed` launcher on one node (`--gpus N`) or many (`--hostfile FILE`).

    neox-launch --config production --gpus 8              # one node
    neox-launch --config production --hostfile hosts.txt  # every slot of every host (pdsh over ssh)
    neox-launch --plan --json --gpus 2 --gpu-mem-gb 24 --config production   # the plan only

Every flag neox-train knows is accepted and passed on; the plan's own choices reach neox-train as
`--ds-config SAVE_DIR/launch/ds_config.json --micro-batch M --grad-accum A
[--activation-checkpointing]`. The launch folder SAVE_DIR/launch/ keeps what was run: plan.json,
ds_config.json, hostfile, .deepspeed_env and command.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neox_train.config import RunConfig
from neox_train.distributed import DEFAULT_MASTER_PORT
from neox_train.ds_config import effective_ds_config, load_ds_config
from neox_train.errors import ConfigError
from neox_train.launch import hostfile, planner, preflight

BIN = Path(sys.executable).parent
LAUNCH_SUBDIR = "launch"

LAUNCHERS = ("pdsh", "openmpi", "slurm")
# What reaches every node through .deepspeed_env besides PATH and PYTHONPATH: credentials and the
# emulator for the bucket, the communication libraries' tuning, and this package's own switches.
FORWARDED_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "OMP_NUM_THREADS",
                   "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE",
                   "TRANSFORMERS_OFFLINE")
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "NEOX_")
# DeepSpeed writes `export K=V` into the remote shell command, wrapping V in double quotes when it
# holds a shell character (multinode_runner.add_export): inside those quotes '"', '$',
# '`' and '\' would still be interpreted.
_UNSAFE_ENV_VALUE = re.compile(r'["$`\\\n]')


# Flags the plan decides; the user's values are the planner's input, the plan's are what neox-train
# receives.
_PLANNED = {"ds_config", "micro_batch", "grad_accum", "activation_checkpointing"}


def forwarded_train_args(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    """neox-train's flags back from the parsed namespace, minus the planned ones (abbreviations and
    `--x=v` forms come out normalised)."""
    out: list[str] = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if (not action.option_strings
                or action.dest in _PLANNED | {"help", "local_rank", "describe"}):
            continue
        value = getattr(ns, action.dest, None)
        flag = (action.option_strings[-1] if action.option_strings[-1].startswith("--")
                else action.option_strings[0])
        if action.nargs == 0:  # a switch (store_true)
            if value:
                out.append(flag)
        elif action.dest == "config" or (value is not None and value != action.default):
            out += [flag, str(value)]
    return out


# -- where -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resources:
    """The GPUs of a launch: this machine's (`pool` None) or a hostfile's selected slots."""

    gpus: int
    nodes: int
    gpus_per_node: int
    pool: "OrderedDict[str, int] | None"  # the hostfile's hosts -> slots; None: single node
    active: "OrderedDict[str, list[int]] | None"  # what the launch uses

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self.active) if self.active else ()


def _local_gpu_count() -> int:
    # deferred (~1.3 s): neox-launch's flag and hostfile errors come before torch loads
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_resources(args: argparse.Namespace) -> Resources:
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus} must be >= 1")
    if not args.hostfile:
        for flag, value in (("--include", args.include), ("--exclude", args.exclude),
                            ("--num-nodes", args.num_nodes)):
            if value:
                raise ConfigError(f"{flag} selects hosts of a hostfile: give --hostfile FILE too")
        gpus = args.gpus if args.gpus is not None else _local_gpu_count()
        if gpus < 1:
            raise ConfigError(
                "no CUDA GPU here: give --gpus N (N ranks on this machine) or --hostfile FILE")
        return Resources(gpus=gpus, nodes=1, gpus_per_node=gpus, pool=None, active=None)
    pool = hostfile.parse_hostfile(args.hostfile)
    active = hostfile.select(pool, include=args.include, exclude=args.exclude,
                             num_nodes=args.num_nodes, source=f"hostfile {args.hostfile}")
    total = sum(len(s) for s in active.values())
    if args.gpus is not None and args.gpus != total:
        filtered = (" after --include/--exclude/--num-nodes"
                    if (args.include or args.exclude or args.num_nodes) else "")
        if args.gpus > total:
            raise ConfigError(f"--gpus {args.gpus} asks for more GPUs than hostfile "
                              f"{args.hostfile} holds{filtered}: {total} slots "
                              f"({hostfile.describe(active)})")
        raise ConfigError(f"--gpus {args.gpus} but hostfile {args.hostfile} selects {total} "
                          f"slots{filtered} ({hostfile.describe(active)}): choose them with "
                          f"--num-nodes/--include/--exclude, or drop --gpus")
    if args.launcher == "openmpi" and (args.include or args.exclude or args.num_nodes):
        raise ConfigError("--launcher openmpi runs every slot of the hostfile (DeepSpeed's OpenMPI "
                          "runner refuses --include/--exclude/--num-nodes): write a hostfile of "
                          "the hosts to use")
    if args.launcher == "slurm":
        # deferred (~1.7 s): only for --launcher slurm
        from deepspeed.launcher.multinode_runner import SlurmRunner

        try:
            SlurmRunner.validate_active_resources(active)
        except ValueError as e:
            raise ConfigError(f"--launcher slurm: {e}") from None
    return Resources(gpus=total, nodes=len(active),
                     gpus_per_node=max(len(s) for s in active.values()), pool=pool, active=active)


# -- the plan --------------------------------------------------------------------------------------
def make_plan(run: RunConfig, args: argparse.Namespace, resources: Resources):
    if args.gpu_mem_gb is not None:
        if args.gpu_mem_gb <= 0:
            raise ConfigError(f"--gpu-mem-gb {args.gpu_mem_gb:g} must be a positive number of GiB")
        mem, source = args.gpu_mem_gb, "--gpu-mem-gb"
    else:
        mem, source = planner.detect_gpu_memory()
        if mem is None and args.plan:
            raise ConfigError("--plan needs the GPU memory: no CUDA device here, so give "
                              "--gpu-mem-gb G (GiB per GPU)")
    forced = None if args.zero == "auto" else int(args.zero)
    if args.offload and forced is None:
        raise ConfigError("--offload needs --zero 2 or --zero 3 (with --zero auto the planner "
                          "offloads only when nothing else fits)")
    req = planner.request_from_run(run, gpus=resources.gpus, nodes=resources.nodes, gpu_mem_gib=mem,
                                   gpu_mem_source=source, forced_stage=forced,
                                   forced_offload=args.offload)
    return req, planner.choose(req)


def plan_table(run: RunConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    def numbers(flag: str, text: str, kind):
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or any(v <= 0 for v in values):
            raise ConfigError(f"{flag} {text!r} must be a comma-separated list of positive numbers")
        return values

    gpus = numbers("--table-gpus", args.table_gpus, int)
    mems = numbers("--table-mem-gb", args.table_mem_gb, float)
    return planner.plan_table(
        lambda g, n, m: planner.request_from_run(run, gpus=g, nodes=n, gpu_mem_gib=m,
                                                 gpu_mem_source="table"),
        gpus, mems)


# -- the environment on every node -----------------------------------------------------------------
def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def deepspeed_env(environ: dict[str, str], cwd: Path) -> tuple[dict[str, str], list[str]]:
    """The variables every node gets through .deepspeed_env, and a note per decision worth telling.

    The user's own ~/.deepspeed_env and ./.deepspeed_env (DeepSpeed would read them; it reads ours
    instead) are merged in and win over what is derived here, since they were written on purpose."""
    notes: list[str] = []
    path_parts = [str(BIN)] + [p for p in environ.get("PATH", "").split(":") if p and p != str(BIN)]
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding neox_train/
    pythonpath = [str(cwd), package_root] + [
        p for p in environ.get("PYTHONPATH", "").split(":") if p]
    env: dict[str, str] = {
        # The virtualenv first: pdsh's remote shell starts with the system PATH.
        "PATH": ":".join(path_parts),
        "PYTHONPATH": ":".join(dict.fromkeys(pythonpath)),
    }
    for key, value in sorted(environ.items()):
        if key in FORWARDED_NAMES or key.startswith(FORWARDED_PREFIXES):
            if key == "GOOGLE_APPLICATION_CREDENTIALS":
                # the remote shell starts elsewhere before its `cd`
                value = str((cwd / value).absolute())
            env[key] = value
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    for base in (Path(environ.get("HOME", "~")).expanduser(), cwd):
        user_file = base / name
        if user_file.is_file():
            mine = _read_env_file(user_file)
            if mine:
                notes.append(f"merged {user_file} ({', '.join(sorted(mine))}); its values win")
            env.update(mine)
    for key in list(env):
        if _UNSAFE_ENV_VALUE.search(env[key]):
            notes.append(
                f"{key} not forwarded: its value holds a character the remote shell would expand")
            del env[key]
    return env, notes


def rendezvous_env(env: dict[str, str], args: argparse.Namespace,
                   resources: Resources) -> list[str]:
    """MASTER_ADDR/MASTER_PORT for the OpenMPI and SLURM runners, added to `env` (.deepspeed_env,
    exported to every rank). Those runners start neox-train without torch.distributed's variables;
    it reads the rank from mpirun's or srun's own (ranks.launcher_env) but needs the first host's
    address from here. Flags win over a user's .deepspeed_env, which wins over the default: the
    first host's name as the hostfile gives it."""
    if args.master_addr:
        env["MASTER_ADDR"] = args.master_addr
    elif "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = resources.hosts[0]
    if args.master_port != DEFAULT_MASTER_PORT or "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(args.master_port)
    return [f"ranks meet at MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']} "
            f"(--master-addr if the ranks reach the first host by another name or address)"]


# -- the command -----------------------------------------------------------------------------------
def deepspeed_command(args: argparse.Namespace, resources: Resources, launch_dir: Path,
                      train_args: list[str]) -> list[str]:
    deepspeed = BIN / "deepspeed"
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed"]
    if resources.pool is None:
        cmd += ["--num_gpus", str(resources.gpus)]
    else:
        cmd += ["--hostfile", str(launch_dir / "hostfile"), "--launcher", args.launcher]
        if args.include:
            cmd += ["--include", args.include]
        if args.exclude:
            cmd += ["--exclude", args.exclude]
        if args.num_nodes:
            cmd += ["--num_nodes", str(args.num_nodes)]
        if args.ssh_port is not None:
            cmd += ["--ssh_port", str(args.ssh_port)]
        if args.no_ssh_check:
            cmd += ["--no_ssh_check"]
        if len(resources.hosts) == 1 and hostfile.ranks_elsewhere(resources.hosts):
            # DeepSpeed starts a single-host job locally unless told otherwise; that host is
            # elsewhere.
            cmd += ["--force_multi"]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    cmd += ["--master_port", str(args.master_port)]
    return cmd + [str(BIN / "neox-train"), *train_args]


def planned_train_args(plan, launch_dir: Path) -> list[str]:
    args = ["--ds-config", str(launch_dir / "ds_config.json"), "--micro-batch",
            str(plan.micro_batch), "--grad-accum", str(plan.grad_accum)]
    return args + (["--activation-checkpointing"] if plan.activation_checkpointing else [])


def write_launch_dir(launch: Launch, plan) -> None:
    d = launch.launch_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "ds_config.json").write_text(json.dumps(launch.ds_config, indent=2) + "\n")
    (d / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    if launch.resources.pool is not None:
        hostfile.write_hostfile(launch.resources.pool, d / "hostfile")
    write_env_file(d, launch.env)
    (d / "command.txt").write_text(shell_line(launch.command, launch.env_file_var) + "\n")


def write_env_file(launch_dir: Path, env: dict[str, str]) -> None:
    # DeepSpeed splits each line at the first '=' and fails on a line without one: no comments, no
    # blank lines.
    (launch_dir / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))


def shell_line(command: list[str], env: dict[str, str]) -> str:
    return " ".join(
        [f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in command])


@dataclass(frozen=True)
class Launch:
    """Everything a launch runs with, resolved before anything is written or started."""

    run: RunConfig
    resources: Resources
    ds_config: dict[str, Any]  # the resolved JSON written to the launch folder
    effective: dict[str, Any]  # what neox-train will make of it (its overrides applied)
    launch_dir: Path
    env: dict[str, str]  # .deepspeed_env
    env_notes: list[str]
    command: list[str]
    env_file_var: dict[str, str]


def prepare_launch(args: argparse.Namespace, tparser: argparse.ArgumentParser,
                   targs: argparse.Namespace, run: RunConfig, resources: Resources, req,
                   plan) -> Launch:
    import torch  # deferred (~1.3 s): see _local_gpu_count

    _, base = load_ds_config(run.ds_config)
    ds_cfg = planner.resolved_ds_config(base, plan, req)
    # What neox-train will make of it, computed now: a conflict (say optimizer_impl with offload)
    # stops here, before any process starts, and pre-flight checks the ops of the config that will
    # really run. Ranks on other hosts are assumed to have GPUs (a login node without CUDA may
    # launch them).
    on_gpu = torch.cuda.is_available() or hostfile.ranks_elsewhere(resources.hosts)
    effective, _ = effective_ds_config(
        ds_cfg, run.replace(micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                            activation_checkpointing=plan.activation_checkpointing),
        dp_size=resources.gpus, on_gpu=on_gpu)
    cwd = Path.cwd()
    launch_dir = (Path(args.launch_dir) if args.launch_dir
                  else Path(run.save_dir) / LAUNCH_SUBDIR).absolute()
    env, env_notes = deepspeed_env(dict(os.environ), cwd)
    if resources.pool is not None and args.launcher in ("openmpi", "slurm"):
        env_notes += rendezvous_env(env, args, resources)
    train_args = forwarded_train_args(tparser, targs) + planned_train_args(plan, launch_dir)
    return Launch(run=run, resources=resources, ds_config=ds_cfg, effective=effective,
                  launch_dir=launch_dir, env=env, env_notes=env_notes,
                  command=deepspeed_command(args, resources, launch_dir, train_args),
                  # DeepSpeed joins DS_ENV_FILE to ~ and to '.': an absolute path wins both joins,
                  # so ours is read.
                  env_file_var={"DS_ENV_FILE": str(launch_dir / ".deepspeed_env")})


def run_preflight(args: argparse.Namespace, launch: Launch, plan) -> list:
    ctx = preflight.PreflightContext(
        run=launch.run, plan=plan, ds_config=launch.effective,
        gpus_per_node=launch.resources.gpus_per_node, hosts=launch.resources.hosts,
        launcher=args.launcher, ssh_port=args.ssh_port, check_ssh=not args.no_ssh_check,
        remote_env=launch.env, cwd=str(Path.cwd()))
    return preflight.run_checks(ctx)


def start_launcher(command: list[str], **popen_args) -> subprocess.Popen:
    """Start the deepspeed launcher with SIGINT ignored. Ctrl-C reaches every process of the job:
    the ranks save and exit (train.run.stop_signals), deepspeed's per-node launch.py stops them with
    SIGTERM; the `deepspeed` runner on top has no handler of its own on one node and would die with
    a KeyboardInterrupt traceback, leaving the launch.py below it orphaned. An ignored signal stays
    ignored across exec (a handled one does not), so launch.py and the ranks, which install their
    own handlers, are unaffected."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.Popen(command, **popen_args)
    finally:
        signal.signal(signal.SIGINT, previous)


def exec_launcher(command: list[str], env: dict[str, str]) -> int:
    """Run the deepspeed launcher in a process group of its own. SIGINT/SIGTERM to neox-launch go to
    the whole job, as a scheduler's or a terminal's would (the ranks save and stop; deepspeed's
    launchers stop them on every node, waiting at most 30 s before SIGKILL). The exit is the
    launcher's, except after such a signal: then 128 + the signal (deepspeed's launch.py exits 1
    after stopping ranks on a signal, which would read as a crash)."""
    proc = start_launcher(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass  # the job is already gone

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = 128 - code if code < 0 else code
    return 128 + received[0] if received and code in (0, 1) else code

