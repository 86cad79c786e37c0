"""Ranks started by Open MPI's mpirun, as `neox-launch --launcher openmpi` starts them through
DeepSpeed's OpenMPI runner (which sets no RANK/WORLD_SIZE and leaves discovery to mpi4py, not
installed here): neox-train takes its rank from mpirun's own variables and MASTER_ADDR from the
environment, so the processes train one job together instead of each training alone into the same
folder. Open MPI comes from Debian (the shared system-tools fixture installs it
where missing)."""

from __future__ import annotations

import shutil

import pytest

from conftest import (
    BIN,
    _free_port,
    read_metrics,
    run_in_own_group,
    test_ds_config,
    tiny_run_config,
    train_env,
)

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def mpirun(system_tools) -> str:
    system_tools("mpirun")
    return shutil.which("mpirun")


def _mpirun_env(**extra: str) -> dict[str, str]:
    env = train_env()
    # Containers run tests as root, which mpirun refuses unless told twice.
    env.pop("MASTER_ADDR", None)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def test_mpirun_ranks_train_one_job(mpirun, tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          mixed_precision="bf16", max_steps=STEPS, save_steps=STEPS, eval_steps=0)
    env = _mpirun_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = [mpirun, "--oversubscribe", "-n", "2", "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x",
           "PATH", "-x", "OMP_NUM_THREADS", str(BIN / "neox-train"), "--config", str(run)]
    proc = run_in_own_group(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = read_metrics(tmp_path / "logs")
    # One job of two ranks: each step took 4 sequences x 2 micro-steps from each rank.
    assert sorted(train) == list(range(1, STEPS + 1))
    assert train[STEPS]["consumed_samples"] == STEPS * 4 * 2 * 2
    tag = tmp_path / "ckpt" / f"global_step{STEPS}"
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert '"dp_size": 2' in (tag / "run.json").read_text()


def test_mpirun_without_master_addr_isone_line(mpirun, tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir)
    cmd = [mpirun, "--oversubscribe", "-n", "2", "-x", "PATH", str(BIN / "neox-train"), "--config",
           str(run)]
    proc = run_in_own_group(cmd, env=_mpirun_env(), timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("neox-train: error: ")]
    assert (lines
            and all("but MASTER_ADDR is not set" in line for line in lines)), proc.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists()
