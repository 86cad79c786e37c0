"""Who this process is in the job: torch.distributed's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
/ MASTER_PORT.

DeepSpeed's own launcher (`deepspeed --num_gpus`, and `--launcher pdsh` through it) sets them. Its
OpenMPI and SLURM runners do not: they start `mpirun ... neox-train` / `srun ... neox-train`
directly and leave it to `deepspeed.init_distributed()` to ask mpi4py. neox-train needs the rank
earlier than that (the data-parallel size decides the batch arithmetic, the rank decides who logs
and uploads) and must not depend on mpi4py being built against the cluster's MPI, so it reads the
variables mpirun and srun export themselves. The first host's address comes from MASTER_ADDR, which
neox-launch puts into .deepspeed_env for these runners.

Also here: the topology (node and local ranks), the process group's start, and the few integer
collectives the start-up needs (agreeing on a checkpoint and on the run's identity). torch and
DeepSpeed are imported inside the functions that need them: neox-launch and neox-sync read rank
facts from this module without paying for torch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from neox_train.errors import ConfigError

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's (TORCH_DISTRIBUTED_DEFAULT_PORT)


def adopt_rank_env() -> None:
    """Give this process torch.distributed's variables in os.environ, once and in one place: those
    DeepSpeed's launcher set are kept; a process started by mpirun or srun gets them from its
    launcher's own (launcher_env); a plain single process gets rank 0 of 1 on a free local port, so
    DeepSpeed skips MPI discovery. Idempotent."""
    os.environ.update(launcher_env(os.environ))
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to add for a process started by mpirun or srun ({} when there
    is nothing to add: DeepSpeed's launcher set them, or this is a plain single process)."""
    if "RANK" in environ:
        return {}
    if "OMPI_COMM_WORLD_SIZE" in environ:  # Open MPI's mpirun
        who = "mpirun (Open MPI)"
        out = {
            "RANK": environ["OMPI_COMM_WORLD_RANK"],
            "WORLD_SIZE": environ["OMPI_COMM_WORLD_SIZE"],
            "LOCAL_RANK": environ["OMPI_COMM_WORLD_LOCAL_RANK"],
            "LOCAL_WORLD_SIZE": environ["OMPI_COMM_WORLD_LOCAL_SIZE"],
        }
    elif "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        # Only srun sets the SLURM_STEP_* variables; a batch script (sbatch) has SLURM_PROCID=0 and
        # the job's SLURM_NTASKS but is one process, so it is not mistaken for rank 0 of many.
        who = "srun (SLURM)"
        out = {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "CROSS_RANK": environ.get("SLURM_NODEID", "0"),
            "CROSS_SIZE": environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1")),
        }
    else:
        return {}
    if int(out["WORLD_SIZE"]) > 1 and not environ.get("MASTER_ADDR"):
        raise ConfigError(
            f"started by {who} as rank {out['RANK']} of {out['WORLD_SIZE']}, but MASTER_ADDR is "
            "not set: launch with neox-launch (it exports the first host as MASTER_ADDR; "
            "--master-addr overrides), or export MASTER_ADDR=<first host's address> (and "
            f"MASTER_PORT, default {DEFAULT_MASTER_PORT}) to every rank"
        )
    out.setdefault("MASTER_ADDR", environ.get("MASTER_ADDR", "127.0.0.1"))
    out["MASTER_PORT"] = environ.get("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    return out


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float | None = None) -> None:
    """The process group, with this process's rank variables in place (ranks.adopt_rank_env).
    `timeout_s`: every collective's timeout (train.watchdog sets it above the hang watchdog's
    allowance); None: DeepSpeed's 30 min."""
    adopt_rank_env()
    # Deferred (here and below): torch and deepspeed (~3 s) load only in processes that train;
    # neox-launch and neox-sync use this module's topology and ports without them.
    import deepspeed
    import torch

    if torch.cuda.is_available():
        # Each rank owns cuda:LOCAL_RANK from the start: DeepSpeed binds the NCCL group to that
        # device but only selects it inside deepspeed.initialize, and the collectives before that
        # (the shared run id) would otherwise run on cuda:0 in every rank, which NCCL refuses.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif os.environ.get("NEOX_CPU_SHM_COMM", "0") != "1":
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce (~40 s on 2
        # cores, and again whenever ninja decides the command changed). gloo does the same job for
        # CPU runs, which are for development and tests; NEOX_CPU_SHM_COMM=1 restores the op.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if timeout_s is None:
        deepspeed.init_distributed()
    else:
        from datetime import timedelta

        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class Topology:
    """Where this rank sits: global rank, rank on its node, its node's index, and the number of
    nodes."""

    rank: int
    local_rank: int
    node_rank: int
    num_nodes: int

    @classmethod
    def from_env(cls) -> "Topology":
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "0")) or 0)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # DeepSpeed's launcher exports CROSS_RANK/CROSS_SIZE (node index/count); derive them
        # otherwise.
        node_rank = int(os.environ.get("CROSS_RANK", rank // local_size if local_size else 0))
        num_nodes = int(os.environ.get("CROSS_SIZE", world // local_size if local_size else 1))
        return cls(rank, local_rank, node_rank, max(num_nodes, 1))


def comm_device():
    """The device collectives run on: this rank's GPU (NCCL), else the CPU (gloo)."""
    import torch  # deferred: see init_distributed

    return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))


def collective_ints(values: list[int], op: str) -> list[int]:
    """broadcast from rank 0 ("broadcast") or element-wise minimum over ranks ("min") of a few
    integers."""
    import torch  # deferred: see init_distributed

    tensor = torch.tensor(values, dtype=torch.int64, device=comm_device())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed.comm as dist

        if op == "broadcast":
            dist.broadcast(tensor, src=0)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return [int(v) for v in tensor.tolist()]


class Control:
    """The ranks' per-step agreement (a pending SIGTERM, a checkpoint still being written) on a CPU
    group.

    gloo sums a few integers of host memory: no device tensor, so no host-device synchronisation and
    no place in the GPU streams. That is what lets the loop agree after every step without a cost
    anyone can measure (bench/save_bench.py measures it). One rank needs no group at all."""

    def __init__(self, world_size: int, *, timeout_s: float | None = None):
        self.world_size = world_size
        self.group = None
        if world_size > 1:
            # deferred with torch (see init_distributed): only processes that train
            from datetime import timedelta

            import torch.distributed as tdist

            # A collective: every rank builds it at the same point. Its timeout, like the main
            # group's, lies above the hang watchdog's allowance.
            self.group = tdist.new_group(
                backend="gloo", timeout=timedelta(seconds=timeout_s) if timeout_s else None)

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over ranks of small integers (counts, flags: exact in float64)."""
        return [int(v) for v in self.sum_floats(values)]

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks in float64 (integers up to 2**53 stay exact; a NaN anywhere
        is NaN everywhere)."""
        if self.group is None:
            return [float(v) for v in values]
        import torch  # deferred: see init_distributed
        import torch.distributed as tdist

        tensor = torch.tensor(values, dtype=torch.float64)
        tdist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj` (small, picklable), in rank order, on every rank."""
        if self.group is None:
            return [obj]
        import torch.distributed as tdist  # deferred: see init_distributed

        out: list[object] = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=self.group)
        return out
