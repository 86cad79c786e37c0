"""Pre-flight: everything a launch needs that can be checked in seconds, as a pass/fail table with a
fix per failure. Run by `neox-launch --check`, and before every real launch.

Each check is a function returning `Check` rows; none of them starts training or changes anything
except the bucket probe (an object written and deleted, as neox-train itself does at start).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from neox_train.checkpoint.publish.publisher import check_storage_access
from neox_train.distributed import Topology
from neox_train.ds_config import DS_CONFIG_DIR, SNAPSHOT_MEMORY_SHARE, checkpoint_bytes
from neox_train.errors import StorageError
from neox_train.launch.hostfile import ranks_elsewhere
from neox_train.units import human_bytes

SSH_TIMEOUT_S = 30
# The versions that decide numerics and checkpoint formats: they must match on every node.
FINGERPRINT_PACKAGES = ("torch", "deepspeed", "transformers", "neox-train")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _pass(name: str, detail: str) -> Check:
    return Check(name, "pass", detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def _skip(name: str, detail: str) -> Check:
    return Check(name, "skip", detail)


@dataclass(frozen=True)
class PreflightContext:
    run: Any  # RunConfig
    plan: Any  # planner.Plan
    ds_config: dict[str, Any]  # the DeepSpeed config neox-train will hand to deepspeed.initialize
    gpus_per_node: int
    hosts: tuple[str, ...] = ()  # empty: single node, this machine
    launcher: str = "pdsh"
    ssh_port: int | None = None
    check_ssh: bool = True
    remote_env: dict[str, str] = field(default_factory=dict)  # the .deepspeed_env exports
    cwd: str = ""


# -- code fingerprint ------------------------------------------------------------------------------
def code_fingerprint(package: Path | None = None) -> str:
    """A short hash of the package's source (every module of every sub-package; `package` defaults
    to the installed neox_train), its shipped DeepSpeed JSONs and the versions of the packages that
    decide numerics: equal on two nodes means they run the same code."""

    h = hashlib.sha256()
    package = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    sources = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    for path in sources:
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    for path in sorted(Path(DS_CONFIG_DIR).glob("*.json")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for name in FINGERPRINT_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{name}=={version}".encode())
    return h.hexdigest()[:16]


# -- the checks ------------------------------------------------------------------------------------
def check_torch() -> list[Check]:
    # Deferred (in each check below too): torch and deepspeed (~3 s) load only when the checks run,
    # not when neox-launch starts.
    import torch

    ds = metadata.version("deepspeed")
    detail = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, deepspeed {ds}"
    if torch.version.cuda and not torch.cuda.is_available():
        return [_fail("torch / CUDA", detail + ": a CUDA build that sees no GPU",
                      "check `nvidia-smi` and the driver (it must support CUDA "
                      + torch.version.cuda + ")")]
    return [_pass("torch / CUDA", detail)]


def _ranks_elsewhere(ctx: PreflightContext) -> bool:
    return ranks_elsewhere(ctx.hosts)


def check_gpus(ctx: PreflightContext) -> list[Check]:
    import torch  # deferred: see check_torch

    if _ranks_elsewhere(ctx):
        return [_skip("GPUs", "this machine is not among the hostfile's hosts: their GPUs are not "
                              "checked from here")]
    if not torch.cuda.is_available():
        return [_pass("GPUs", f"no CUDA device: {ctx.gpus_per_node} rank(s) per node run on "
                              f"DeepSpeed's CPU accelerator (gloo) - development and tests only")]
    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    detail = (f"{count} x {props[0].name}, "
              + ", ".join(f"{p.total_memory / 2**30:.1f}" for p in props) + " GiB")
    checks = []
    if count < ctx.gpus_per_node:
        checks.append(_fail("GPUs",
                            f"{ctx.gpus_per_node} per node asked, {count} visible here ({detail})",
                            "use --gpus/slots= at most the GPUs a node has, or unset "
                            "CUDA_VISIBLE_DEVICES"))
    else:
        checks.append(_pass("GPUs", detail))
    if ctx.plan.gpu_mem_gib is not None:
        smallest = min(p.total_memory for p in props) / 2**30
        if smallest + 0.5 < ctx.plan.gpu_mem_gib:
            checks.append(_fail("GPU memory", f"planned for {ctx.plan.gpu_mem_gib:g} GiB per GPU, "
                                              f"the smallest here has {smallest:.1f} GiB",
                                "drop --gpu-mem-gb (read from the device) or give the real size"))
    return checks


def check_bf16(ctx: PreflightContext) -> list[Check]:
    import torch  # deferred: see check_torch

    if ctx.plan.precision != "bf16":
        return [_skip("bf16", f"not used (precision {ctx.plan.precision})")]
    if _ranks_elsewhere(ctx):
        return [_skip("bf16",
                      "this machine is not among the hostfile's hosts: not checked from here")]
    if not torch.cuda.is_available():
        return [_pass("bf16", "the CPU accelerator computes in bf16")]
    if torch.cuda.is_bf16_supported():
        return [_pass("bf16", "supported by the GPU")]
    return [_fail("bf16", f"{torch.cuda.get_device_name(0)} has no bf16 support",
                  "train with --mixed-precision fp16 (pre-Ampere GPUs such as V100 and T4)")]


def needed_ops(ds_config: dict[str, Any], *, on_gpu: bool) -> list[str]:
    """The DeepSpeed op builders this (effective) config makes DeepSpeed JIT-build at start."""
    zero = ds_config.get("zero_optimization") or {}
    opt = ds_config.get("optimizer") or {}
    ops = []
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        ops.append("CPUAdamBuilder")  # offloaded Adam runs DeepSpeedCPUAdam
    elif (str(opt.get("type", "")).lower() in ("adam", "adamw")
            and (opt.get("params") or {}).get("torch_adam") is False):
        # DeepSpeed's FusedAdam (a CUDA kernel, or its CPU op on CPU)
        ops.append("FusedAdamBuilder")
    if not on_gpu and os.environ.get("NEOX_CPU_SHM_COMM", "0") == "1":
        # neox-train uses gloo on CPU unless this asks for DeepSpeed's op
        ops.append("ShareMemCommBuilder")
    return ops


def check_ops(ctx: PreflightContext) -> list[Check]:
    import torch  # deferred: see check_torch
    from deepspeed.accelerator import get_accelerator

    ops = needed_ops(ctx.ds_config, on_gpu=torch.cuda.is_available())
    if not ops:
        return [_pass("DeepSpeed ops", "none to build (torch AdamW, no offload)")]
    checks = []
    for name in ops:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            checks.append(_fail("DeepSpeed ops", f"{name} is not compatible with this machine",
                                "run `ds_report` for the missing piece (compiler, CUDA toolkit), "
                                "or choose a config that does not need it (no offload; "
                                "torch_adam)"))
            continue
        try:
            # The same JIT build DeepSpeed does at start, once here (cached in
            # ~/.cache/torch_extensions) instead of in every rank at once.
            builder.load(verbose=False)
        except Exception as e:  # a compiler error is whatever the toolchain says
            checks.append(_fail("DeepSpeed ops",
                                f"{name} failed to build: {' '.join(str(e).split())[:300]}",
                                "install a C++ compiler and ninja (`apt-get install g++ "
                                "ninja-build`), then `ds_report`"))
            continue
        checks.append(_pass("DeepSpeed ops", f"{name} builds and loads"))
    return checks


def ssh_check_command(host: str, port: int | None) -> list[str]:
    """DeepSpeed's own check (launcher/runner.py:
    `ssh -o PasswordAuthentication=no [-p P] HOST hostname`), in batch mode so a host that would
    prompt fails instead of hanging."""
    cmd = ["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o",
           f"ConnectTimeout={SSH_TIMEOUT_S}"]
    if port is not None:
        cmd += ["-p", str(port)]
    return cmd + [host, "hostname"]


def _remote_exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())


def _probe_host(host: str, ctx: PreflightContext, local_fp: str) -> list[Check]:
    name = f"host {host}"
    try:
        reach = subprocess.run(ssh_check_command(host, ctx.ssh_port), capture_output=True,
                               text=True, timeout=SSH_TIMEOUT_S + 10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        reach = subprocess.CompletedProcess([], 255, "", f"no answer in {SSH_TIMEOUT_S + 10} s")
    if reach.returncode != 0:
        why = " ".join(reach.stderr.split())[-200:] or f"ssh exited {reach.returncode}"
        return [_fail(name, f"not reachable over ssh: {why}",
                      f"set up passwordless ssh from this machine to {host} (ssh-keygen; "
                      f"ssh-copy-id {host}), give --ssh-port if sshd is not on 22, or fix the name "
                      "in the hostfile")]
    checks = [_pass(name, f"reachable over ssh (hostname {reach.stdout.strip()})")]
    # The same interpreter path, working folder and exports the launch uses on that host.
    remote = (f"cd {shlex.quote(ctx.cwd)} && "
              f"{_remote_exports(ctx.remote_env)}{shlex.quote(sys.executable)} -c "
              + shlex.quote("from neox_train.launch.preflight import code_fingerprint; "
                            "print(code_fingerprint())"))
    cmd = ssh_check_command(host, ctx.ssh_port)[:-1] + [remote]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], 1, "", "no answer in 120 s")
    remote_fp = (proc.stdout.strip().splitlines()[-1]
                 if proc.returncode == 0 and proc.stdout.strip() else None)
    if remote_fp is None:
        why = " ".join(proc.stderr.split())[-240:] or f"exit {proc.returncode}"
        checks.append(_fail(f"code on {host}",
                            f"cannot run {sys.executable} in {ctx.cwd} there: {why}",
                            "install the same checkout and virtualenv at the same path on every "
                            "node (or a shared filesystem)"))
    elif remote_fp != local_fp:
        checks.append(_fail(f"code on {host}",
                            f"code fingerprint {remote_fp}, this machine {local_fp}",
                            "sync the checkout (same commit) and the virtualenv (same "
                            "torch/deepspeed/transformers) to every node"))
    else:
        checks.append(_pass(f"code on {host}", f"same code and packages (fingerprint {local_fp})"))
    return checks


def check_hosts(ctx: PreflightContext) -> list[Check]:
    if not ctx.hosts:
        return [_skip("hosts", "single node: this machine only")]
    checks = []
    runner = {"pdsh": "pdsh", "openmpi": "ompi_info", "slurm": "sinfo"}.get(ctx.launcher)
    if runner and shutil.which(runner) is None:
        package = {"pdsh": "pdsh", "ompi_info": "openmpi-bin", "sinfo": "slurm-client"}[runner]
        checks.append(_fail("launcher",
                            f"--launcher {ctx.launcher} needs `{runner}`, which is not on PATH",
                            f"install it (Debian/Ubuntu: apt-get install {package}) or choose "
                            "another --launcher"))
    else:
        checks.append(_pass("launcher",
                            f"{ctx.launcher} ({shutil.which(runner) if runner else 'built in'})"))
    if not ctx.check_ssh:
        return checks + [_skip("hosts",
                               "--no-ssh-check: reachability and code versions not checked")]
    local_fp = code_fingerprint()
    with ThreadPoolExecutor(max_workers=min(16, len(ctx.hosts))) as pool:
        for rows in pool.map(lambda h: _probe_host(h, ctx, local_fp), ctx.hosts):
            checks.extend(rows)
    return checks



def checkpoints_kept(run) -> int:
    """How many checkpoints can sit on local disk at once: keep_last_n plus the one being written
    (retention runs after a save); keep_last_n 0 keeps them all."""
    total = -(-run.max_steps // run.save_steps) + 1
    return total if run.keep_last_n == 0 else min(run.keep_last_n + 1, total)



def check_disk(ctx: PreflightContext) -> list[Check]:
    save_dir = Path(ctx.run.save_dir).absolute()
    existing = save_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    n = checkpoints_kept(ctx.run)
    need = n * checkpoint_bytes(ctx.plan.shape.total_params, ctx.plan.precision,
                                ctx.plan.zero_stage)
    detail = (f"{human_bytes(free)} free at {existing}; {n} checkpoint(s) of "
              f"{human_bytes(need // n)} need {human_bytes(need)}")
    if free < need:
        return [_fail("disk", detail, "free space, point --save-dir at a larger disk, or lower "
                                      "keep_last_n in the run config")]
    return [_pass("disk",
                  detail + (" (more while uploads lag: retention waits for verified remote copies)"
                            if ctx.run.sync_to else ""))]


def check_host_memory(ctx: PreflightContext) -> list[Check]:
    """Offload needs its host memory (fail without it); the asynchronous save's snapshot only gets a
    note: without the memory the run saves synchronously (slower saves, nothing lost)."""
    chosen = ctx.plan.chosen
    have = psutil.virtual_memory().total
    snapshot = chosen.snapshot_per_node if ctx.run.async_save else 0
    states = chosen.cpu_per_node - chosen.snapshot_per_node
    gib = 2**30
    if ctx.plan.variant.offload != "none":
        detail = (f"offload needs ~{states / gib:.1f} GiB of host memory per node, this one has "
                  f"{have / gib:.1f} GiB")
        if have < states:
            return [_fail("host memory", detail,
                          "use more GPUs (ZeRO-3 without offload) or nodes with more memory")]
    else:
        detail = f"this node has {have / gib:.1f} GiB"
    if snapshot:
        fits = ((states if ctx.plan.variant.offload != "none" else 0) + snapshot
                <= SNAPSHOT_MEMORY_SHARE * have)
        detail += (f"; asynchronous saves snapshot ~{snapshot / gib:.1f} GiB per node"
                   + ("" if fits else " (too much: saves will be synchronous, with a WARNING)"))
    return [_pass("host memory", detail)]


def check_bucket(ctx: PreflightContext) -> list[Check]:
    if ctx.run.sync_to is None:
        return [_skip("bucket", "no --sync-to: checkpoints stay local")]

    try:
        # As global rank 0 does at the start of training: write and delete a probe object.
        check_storage_access(ctx.run, Topology(rank=0, local_rank=0, node_rank=0, num_nodes=1),
                             node_local=False)
    except StorageError as e:
        return [_fail("bucket", str(e),
                      "check --credentials / GOOGLE_APPLICATION_CREDENTIALS, the bucket name, and "
                      "that the account may create and delete objects (roles/storage.objectAdmin)")]
    return [_pass("bucket", f"{ctx.run.sync_to}: probe object written and deleted")]


def run_checks(ctx: PreflightContext) -> list[Check]:
    checks: list[Check] = []
    for fn in (lambda: check_torch(), lambda: check_gpus(ctx), lambda: check_bf16(ctx),
               lambda: check_ops(ctx), lambda: check_hosts(ctx), lambda: check_disk(ctx),
               lambda: check_host_memory(ctx), lambda: check_bucket(ctx)):
        checks.extend(fn())
    return checks


def format_checks(checks: list[Check]) -> str:
    """A plain-text table: check, status, detail, and the fix under each failure."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status.upper():<6}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<{width}}  {'':<6}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")}
    lines.append(
        f"pre-flight: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.failed for c in checks), "checks": [asdict(c) for c in checks]}
