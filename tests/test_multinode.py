"""A real multi-node launch on one machine: sshd on a loopback port, two host aliases of 127.0.0.1
with one slot each, `neox-launch --hostfile` with the pdsh runner. Two ranks on two "nodes" train,
save, and resume exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    BIN,
    _free_port,
    copy_checkpoint,
    read_metrics,
    run_in_own_group,
    test_ds_config,
    tiny_run_config,
    train_env,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 4
SAVE_AT = 2
LAUNCH_TIMEOUT_S = 400  # 2 shared cores: the launcher, pdsh, ssh and two ranks import torch at once


def neox_launch(cluster, args: list[str], *, cwd: Path, extra_env: dict[str, str] | None = None,
                timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = cluster.env(train_env())
    env.update(extra_env or {})
    cmd = [str(BIN / "neox-launch"), *map(str, args)]
    # Own process group: a hung launch dies whole (the ranks under sshd are stopped with the
    # cluster).
    return run_in_own_group(cmd, env=env, cwd=cwd, timeout=timeout)


def test_two_nodes_train_save_and_resume(ssh_cluster, tmp_path, token_dir):
    started = time.monotonic()
    hosts = ssh_cluster.write_hostfile(tmp_path / "hostfile", slots=1)
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          max_steps=MAX_STEPS, save_steps=SAVE_AT, eval_steps=SAVE_AT)
    common = ["--hostfile", hosts, "--launcher", "pdsh", "--master-addr", "127.0.0.1", "--config",
              run]
    # A marker that reaches the ranks only through .deepspeed_env (pdsh's remote shell starts from a
    # bare env).
    marker = {"NEOX_LAUNCH_TEST_MARK": "two-nodes"}

    first = neox_launch(ssh_cluster, common + ["--master-port", _free_port()], cwd=tmp_path,
                        extra_env=marker)
    first_s = time.monotonic() - started
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-6000:]
    # Pre-flight ran and passed for both hosts before the launcher started.
    for host in ("node0", "node1"):
        assert f"host {host}" in first.stderr and f"code on {host}" in first.stderr
    assert "pre-flight: " in first.stderr and " 0 failed" in first.stderr
    # Both "nodes" ran a rank: pdsh prefixes every remote line with its host, and each node's
    # launcher reports.
    out = first.stdout + first.stderr
    assert "node0: " in out and "node1: " in out
    assert out.count("exits successfully") == 2
    launch_dir = tmp_path / "ckpt" / "launch"
    env_file = (launch_dir / ".deepspeed_env").read_text()
    assert "NEOX_LAUNCH_TEST_MARK=two-nodes" in env_file and env_file.startswith(f"PATH={BIN}:")
    # DeepSpeed's runner logs the pdsh command it ran: the file's variables are exported in every
    # node's shell.
    assert "export NEOX_LAUNCH_TEST_MARK=two-nodes;" in out and f"export PATH={BIN}:" in out

    train = read_metrics(tmp_path / "logs")
    assert sorted(train) == list(range(1, MAX_STEPS + 1))
    # micro 4 x accumulation 2 x 2 ranks
    assert train[MAX_STEPS]["consumed_samples"] == MAX_STEPS * 4 * 2 * 2
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"global_step{MAX_STEPS}"
    for step in (SAVE_AT, MAX_STEPS):
        tag = ckpt / f"global_step{step}"
        assert json.loads((tag / "run.json").read_text())["dp_size"] == 2
        # ZeRO-2: one optimizer shard per rank, one per node
        assert len(list(tag.glob("*optim_states.pt"))) == 2

    # Resume on the two nodes from the middle checkpoint (a fresh save dir holding only it): the
    # steps after it repeat the first run's losses.
    resumed_dir = tmp_path / "resumed"
    copy_checkpoint(ckpt, resumed_dir / "ckpt", f"global_step{SAVE_AT}")
    second = neox_launch(ssh_cluster, common + ["--master-port", _free_port(), "--resume", "latest",
                                                "--save-dir", resumed_dir / "ckpt", "--log-dir",
                                                resumed_dir / "logs"],
                         cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-6000:]
    resumed = read_metrics(resumed_dir / "logs")
    assert sorted(resumed) == list(range(SAVE_AT + 1, MAX_STEPS + 1))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(train[step]["loss"], abs=1e-5), \
            (step, resumed[step], train[step])
    assert (resumed_dir / "ckpt" / "latest").read_text().strip() == f"global_step{MAX_STEPS}"
    total_s = time.monotonic() - started
    print(f"\ntwo-node test: first launch {first_s:.1f} s, train + resume {total_s:.1f} s wall")


def test_check_sees_other_code_on_a_node(ssh_cluster, tmp_path, token_dir):
    """Pre-flight compares each node's code fingerprint with this machine's. Launching from a folder
    that holds another copy of the package puts that copy first on the nodes' PYTHONPATH
    (.deepspeed_env), as a stale checkout on a real node would be: the check must say so."""
    hosts = ssh_cluster.write_hostfile(tmp_path / "hostfile", slots=1)
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)))
    common = ["--hostfile", hosts, "--config", run, "--check", "--json"]

    same = neox_launch(ssh_cluster, common, cwd=tmp_path, timeout=180)
    rows = {c["name"]: c for c in json.loads(same.stdout)["checks"]}
    assert same.returncode == 0, same.stdout + same.stderr[-3000:]
    assert rows["host node0"]["status"] == rows["code on node1"]["status"] == "pass"

    stale = tmp_path / "neox_train"
    shutil.copytree(Path(__file__).resolve().parent.parent / "neox_train", stale,
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (stale / "model.py").open("a") as f:
        f.write("\n# an edit the other nodes do not have\n")
    other = neox_launch(ssh_cluster, common, cwd=tmp_path, timeout=180)
    rows = {c["name"]: c for c in json.loads(other.stdout)["checks"]}
    assert other.returncode == 1
    for host in ("node0", "node1"):
        assert rows[f"host {host}"]["status"] == "pass"
        assert (rows[f"code on {host}"]["status"] == "fail"
                and "code fingerprint" in rows[f"code on {host}"]["detail"])
        assert "sync the checkout" in rows[f"code on {host}"]["fix"]
