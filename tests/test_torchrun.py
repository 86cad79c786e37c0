"""neox-train under PyTorch's own launcher, as docs/launching.md shows it:
`torchrun ... $(which neox-train)`, and the Kubeflow PyTorchJob script built on it (one torchrun
agent per pod, the node's rank and count from the operator's PET_* variables,
MASTER_ADDR/MASTER_PORT from the environment).

Two agents on this machine stand in for two pods of one CPU rank each; a SIGTERM to both (what
Kubernetes sends a preempted pod) must reach the ranks, which save at the same step and exit, within
torchrun's --shutdown-timeout; the job then resumes from that checkpoint under
`torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time

import yaml

from neox_train.flags import train_parser

from conftest import (
    BIN,
    REPO,
    _free_port,
    read_metrics,
    run_in_own_group,
    test_ds_config,
    tiny_run_config,
    train_env,
)

STOP_BY = 100_000  # max_steps: the first run only ends by SIGTERM


def _pytorchjob() -> dict:
    text = (REPO / "docs" / "launching.md").read_text()
    block = re.search(r"```yaml\n(apiVersion: kubeflow.org/v1\n.*?)```", text, re.S)
    assert block, "docs/launching.md lost its PyTorchJob example"
    return yaml.safe_load(block.group(1))


def _script(job: dict) -> str:
    container, = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return container["args"][0]


def _agent(node_rank: int, port: int, run, *extra: str) -> subprocess.Popen:
    """The PyTorchJob script's torchrun command, with the operator's variables for a 2-pod job of 1
    rank each."""
    env = train_env()
    env.update(PET_NNODES="2", PET_NODE_RANK=str(node_rank), PET_NPROC_PER_NODE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [str(BIN / "torchrun"), "--nnodes", env["PET_NNODES"], "--node_rank",
           env["PET_NODE_RANK"], "--nproc_per_node", env["PET_NPROC_PER_NODE"], "--master_addr",
           env["MASTER_ADDR"], "--master_port", env["MASTER_PORT"], "--shutdown-timeout", "120",
           str(BIN / "neox-train"), "--config", str(run), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_the_pytorchjob_example_is_well_formed():
    job = _pytorchjob()
    pods = job["spec"]["pytorchReplicaSpecs"]
    # the anchor: every pod runs the same script
    assert pods["Worker"]["template"] == pods["Master"]["template"]
    container, = pods["Master"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["ports"][0]["name"] == "pytorchjob-port"
    script = _script(job)
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    words = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))
    torchrun = dict(zip(words[1:words.index(".venv/bin/neox-train"):2],
                        words[2:words.index(".venv/bin/neox-train"):2]))
    assert {"--nnodes", "--node_rank", "--nproc_per_node", "--master_addr", "--master_port",
            "--shutdown-timeout"} <= set(torchrun)
    # The pod must outlive torchrun's grace for its ranks, or the kubelet kills the save it waits
    # for.
    grace = pods["Master"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(torchrun["--shutdown-timeout"])
    flags = [w for w in words[words.index(".venv/bin/neox-train") + 1:] if w != "$RESUME"]
    # every flag is neox-train's (argparse exits if not)
    train_parser().parse_args(flags + ["--resume", "latest"])


def test_two_torchrun_agents_train_stop_on_sigterm_and_resume(tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          max_steps=STOP_BY, save_steps=STOP_BY, eval_steps=0, log_steps=1)
    port = _free_port()
    agents = [_agent(rank, port, run) for rank in (0, 1)]
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (
            metrics.is_file() and metrics.read_text().count('"train"') >= 3):
        assert all(a.poll() is None for a in agents), agents[0].stderr.read()[-3000:]
        time.sleep(0.2)
    at_signal = max(read_metrics(tmp_path / "logs"))
    for a in agents:
        # what the kubelet sends every pod of a deleted or preempted job
        a.send_signal(signal.SIGTERM)
    errs = [a.communicate(timeout=180)[1] for a in agents]
    assert "stop requested (SIGTERM)" in errs[0], errs[0][-3000:]

    train = read_metrics(tmp_path / "logs")
    stopped = max(train)
    # The ranks agree after every step: the stop comes within the step the signal arrived in (and
    # the one being logged while it did), not up to ten later.
    assert at_signal <= stopped <= at_signal + 2, (at_signal, stopped)
    # one job of 2 ranks, not two of 1
    assert train[stopped]["consumed_samples"] == stopped * 4 * 2 * 2
    tag = tmp_path / "ckpt" / f"global_step{stopped}"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == tag.name
    assert len(list(tag.glob("*optim_states.pt"))) == 2

    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(BIN / "neox-train"), "--config", str(run), "--resume", "latest", "--max-steps",
           str(stopped + 2)]
    proc = run_in_own_group(cmd, env=train_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {tag}: step {stopped}" in proc.stderr
    resumed = read_metrics(tmp_path / "logs")
    assert resumed[stopped + 2]["consumed_samples"] == (stopped + 2) * 4 * 2 * 2
