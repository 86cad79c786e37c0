"""neox-launch without a cluster: hostfile parsing and filters, every bad input (one line, exit 2,
nothing started), the exact deepspeed command and launch folder of --dry-run, .deepspeed_env, the
pre-flight table, and launcher/start_training.sh. The real multi-node launch is in
test_multinode.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest

from neox_train.cli.launch import main
from neox_train.launch import hostfile, preflight
from neox_train.launch.hostfile import HostfileError
from neox_train.launch.launcher import deepspeed_env

from conftest import BIN, REPO, test_ds_config, tiny_run_config
from gcs import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def run_json(tmp_path, token_dir) -> Path:
    return tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)))


def launch(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("neox-launch: error: "), err
    for fragment in fragments:
        assert fragment in line, line
    return line


# -- hostfile --------------------------------------------------------------------------------------
def test_hostfile_parses_comments_blanks_and_trailing_comments(tmp_path):
    path = write(tmp_path / "hosts",
                 "# cluster A\n\nworker-0 slots=8\n  worker-1   slots=4   # half a box\n")
    assert hostfile.parse_hostfile(path) == OrderedDict([("worker-0", 8), ("worker-1", 4)])
    # DeepSpeed's own parser reads the same file the same way.
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(path))) == {"worker-0": 8, "worker-1": 4}


@pytest.mark.parametrize("text,fragments", [
    ("node0 slots=2\nnode1 slot=2\n", ["line 2", "'node1 slot=2' is not 'HOST slots=N'"]),
    ("node0 slots=2\n\n# x\nnode1\n", ["line 4", "'node1' is not"]),
    ("node0 slots=2 gpus=8\n", ["line 1", "is not 'HOST slots=N'"]),
    ("node0 slots=2\nnode1 slots=2\nnode0 slots=4\n",
     ["line 3", "host node0 is listed again (first on line 1)"]),
    ("node0 slots=0\n", ["line 1", "node0 slots=0: slots must be a positive integer"]),
    ("node0 slots=-2\n", ["line 1", "slots=-2: slots must be a positive integer"]),
    ("node0 slots=two\n", ["slots=two: slots must be a positive integer"]),
    ("# nothing but a comment\n\n", ["lists no hosts"]),
])
def test_bad_hostfile_isone_line(tmp_path, text, fragments):
    path = write(tmp_path / "hosts", text)
    with pytest.raises(HostfileError) as err:
        hostfile.parse_hostfile(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_select_uses_deepspeeds_filter_rules():
    pool = OrderedDict([("a", 4), ("b", 4), ("c", 2)])
    assert hostfile.select(pool) == OrderedDict([("a", [0, 1, 2, 3]), ("b", [0, 1, 2, 3]),
                                                 ("c", [0, 1])])
    assert (hostfile.select(pool, include="b:0,2@a")
            == OrderedDict([("a", [0, 1, 2, 3]), ("b", [0, 2])]))
    assert hostfile.select(pool, exclude="a@b:1") == OrderedDict([("b", [0, 2, 3]), ("c", [0, 1])])
    assert hostfile.select(pool, num_nodes=2) == OrderedDict(
        [("a", [0, 1, 2, 3]), ("b", [0, 1, 2, 3])])


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(include="a@zz"),
     "--include 'a@zz' names host 'zz', which is not in the hostfile (hosts: a, b)"),
    (dict(exclude="q"), "--exclude 'q' names host 'q'"),
    (dict(include="a:7"), "a has no slot 7 (its slots are 0..3)"),
    (dict(include="a:x"), "must be HOST:SLOT[,SLOT...] with integer slots"),
    (dict(include="a", exclude="b"), "mutually exclusive"),
    (dict(include="a", num_nodes=1), "--num-nodes cannot be combined with --include/--exclude"),
    (dict(num_nodes=3), "--num-nodes 3 is out of range: the hostfile lists 2 host(s)"),
    (dict(exclude="a@b"), "leaves no slots"),
])
def test_bad_filters(kwargs, fragment):
    with pytest.raises(HostfileError) as err:
        hostfile.select(OrderedDict([("a", 4), ("b", 2)]), **kwargs)
    assert fragment in str(err.value)


# -- bad input through the command: one line, exit 2, no launch folder -----------------------------
@pytest.mark.parametrize("args,fragments", [
    (["--gpus", "0"], ["--gpus 0 must be >= 1"]),
    (["--gpus", "2", "--include", "node0"],
     ["--include selects hosts of a hostfile: give --hostfile FILE too"]),
    (["--hostfile", "{hosts}", "--gpus", "3"],
     ["--gpus 3 asks for more GPUs than hostfile", "holds: 2 slots (node0 (1), node1 (1))"]),
    (["--hostfile", "{hosts}", "--gpus", "1"], ["--gpus 1 but hostfile", "selects 2 slots"]),
    (["--hostfile", "{hosts}", "--include", "node9"],
     ["names host 'node9', which is not in hostfile"]),
    (["--hostfile", "{hosts}", "--exclude", "node0:3"], ["node0 has no slot 3"]),
    (["--hostfile", "{bad_hosts}"], ["line 3", "'node2 slots 4' is not 'HOST slots=N'"]),
    (["--hostfile", "{dup_hosts}"], ["line 2", "host node0 is listed again"]),
    (["--hostfile", "{zero_hosts}"], ["node1 slots=0: slots must be a positive integer"]),
    (["--hostfile", "{tmp}/missing"], ["does not exist"]),
    (["--hostfile", "{hosts}", "--launcher", "openmpi", "--num-nodes", "1"],
     ["--launcher openmpi runs every slot"]),
    (["--hostfile", "{hosts2}", "--launcher", "slurm", "--include", "node0:1"],
     ["--launcher slurm", "cannot select specific device ids"]),
    (["--gpus", "1", "--offload"], ["--offload needs --zero 2 or --zero 3"]),
    (["--gpus", "1", "--zero", "1", "--offload", "--gpu-mem-gb", "80"],
     ["--offload needs --zero 2 or 3"]),
    (["--gpus", "1", "--gpu-mem-gb", "-3"], ["--gpu-mem-gb -3 must be a positive number"]),
    (["--gpus", "1", "--describe"], ["use `neox-launch --plan`"]),
    (["--gpus", "1", "--micro-batch", "3", "--grad-accum", "0"], ["grad_accum=0 is out of range"]),
])
def test_bad_input_is_one_line_before_anything_starts(capsys, tmp_path, run_json, args, fragments):
    files = {
        "hosts": write(tmp_path / "hosts", "node0 slots=1\nnode1 slots=1\n"),
        "hosts2": write(tmp_path / "hosts2", "node0 slots=2\nnode1 slots=2\n"),
        "bad_hosts": write(tmp_path / "bad", "node0 slots=1\n# two\nnode2 slots 4\n"),
        "dup_hosts": write(tmp_path / "dup", "node0 slots=1\nnode0 slots=1\n"),
        "zero_hosts": write(tmp_path / "zero", "node0 slots=1\nnode1 slots=0\n"),
        "tmp": tmp_path,
    }
    argv = ["--config", run_json] + [a.format(**files) for a in args]
    code, out, err = launch(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert out == ""
    assert not (tmp_path / "ckpt").exists()  # nothing written, nothing started


def test_unknown_flag_is_argparse_usage(capsys, run_json):
    code, out, err = launch(capsys, "--config", run_json, "--gpus", "1", "--no-such-flag")
    assert code == 2 and "neox-launch: error: unrecognized arguments: --no-such-flag" in err


def test_plan_that_cannot_fit(capsys):
    code, _, err = launch(capsys, "--plan", "--gpus", "1", "--gpu-mem-gb", "4", "--config",
                          "production")
    assert_one_line_error(code, err, "does not fit 1 GPU of 4 GiB", "needs 3.54 GiB per GPU")


def test_plan_without_memory_on_cpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU memory is read from the device here")
    code, _, err = launch(capsys, "--plan", "--gpus", "2", "--config", "production")
    assert_one_line_error(code, err, "--plan needs the GPU memory", "--gpu-mem-gb")


def test_unreachable_host_stops_the_launch(capsys, tmp_path, run_json, system_tools):
    """DeepSpeed's ssh check, run by pre-flight for every host before the launcher starts."""
    # the launcher's own check comes first: without pdsh it would fail there
    system_tools("pdsh", "ssh")
    hosts = write(tmp_path / "hosts", "localhost slots=1\nunreachable-host.invalid slots=1\n")
    code, out, err = launch(capsys, "--config", run_json, "--hostfile", hosts, "--master-addr",
                            "127.0.0.1")
    line = assert_one_line_error(code, err, "pre-flight failed: host ", "not reachable over ssh",
                                 "fix: set up passwordless ssh")
    assert "unreachable-host.invalid" in err and "PASS" in err  # the table came first, on stderr
    assert "FAIL" in err and not (tmp_path / "ckpt" / "launch").exists()
    assert line.count("\n") == 0


# -- dry run: the exact command and the launch folder ----------------------------------------------
def test_dry_run_single_node(capsys, tmp_path, run_json):
    code, out, err = launch(capsys, "--config", run_json, "--gpus", "2", "--master-port", "29777",
                            "--dry-run", "--json", "--max-steps", "7", "--resume", "latest",
                            "--no-background-upload", "--sync-to", tmp_path / "bucket",
                            "--eval-steps", "0", "--takeover")
    assert code == 0, err
    got = json.loads(out)
    launch_dir = tmp_path / "ckpt" / "launch"
    assert got["launch_dir"] == str(launch_dir)
    assert got["command"] == [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29777",
        str(BIN / "neox-train"), "--config", str(run_json), "--max-steps", "7", "--eval-steps", "0",
        "--resume", "latest", "--sync-to", str(tmp_path / "bucket"), "--takeover",
        "--no-background-upload", "--ds-config", str(launch_dir / "ds_config.json"),
        "--micro-batch", "4", "--grad-accum", "2",
    ]
    assert got["env"] == {"DS_ENV_FILE": str(launch_dir / ".deepspeed_env")}
    ds = json.loads((launch_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2  # CPU: the configured stage, said so in the plan
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
             ds["train_batch_size"])
    assert batch == (4, 2, 16)
    plan = json.loads((launch_dir / "plan.json").read_text())
    assert plan["fits"] is None and "GPU memory unknown" in plan["reason"]
    assert (launch_dir / "command.txt").read_text().startswith(
        f"DS_ENV_FILE={launch_dir / '.deepspeed_env'} ")
    assert not (launch_dir / "hostfile").exists()


def test_dry_run_hostfile(capsys, tmp_path, run_json):
    hosts = write(tmp_path / "hosts", "# two boxes\nnode0 slots=2\nnode1 slots=2 # the other\n")
    code, out, err = launch(capsys, "--config", run_json, "--hostfile", hosts, "--include",
                            "node0@node1:1", "--ssh-port", "2222", "--launcher", "pdsh",
                            "--dry-run")
    assert code == 0, err
    launch_dir = tmp_path / "ckpt" / "launch"
    assert out.strip() == (
        f"DS_ENV_FILE={launch_dir / '.deepspeed_env'} {BIN / 'deepspeed'} --hostfile "
        f"{launch_dir / 'hostfile'} --launcher pdsh --include node0@node1:1 --ssh_port 2222 "
        f"--master_port 29500 {BIN / 'neox-train'} --config {run_json} --ds-config "
        f"{launch_dir / 'ds_config.json'} --micro-batch 4 --grad-accum 2"
    )
    # The normalised hostfile DeepSpeed reads; the plan counted the 3 selected slots.
    assert (launch_dir / "hostfile").read_text() == "node0 slots=2\nnode1 slots=2\n"
    plan = json.loads((launch_dir / "plan.json").read_text())
    assert (plan["gpus"], plan["nodes"], plan["train_batch"]) == (3, 2, 4 * 2 * 3)


def test_launch_dir_can_live_on_a_shared_path(capsys, tmp_path, run_json):
    """With node-local checkpoint folders every node must still read the resolved JSON: --launch-dir
    moves it."""
    hosts = write(tmp_path / "hosts", "node0 slots=1\nnode1 slots=1\n")
    shared = tmp_path / "shared" / "launch"
    code, out, err = launch(capsys, "--config", run_json, "--hostfile", hosts, "--dry-run",
                            "--json", "--launch-dir", shared)
    assert code == 0, err
    got = json.loads(out)
    assert (got["launch_dir"] == str(shared)
            and f"--ds-config={shared / 'ds_config.json'}" in "=".join(got["command"]))
    assert (shared / "ds_config.json").is_file() and (shared / "hostfile").is_file()
    assert not (tmp_path / "ckpt" / "launch").exists()


def test_single_remote_host_forces_multinode(capsys, tmp_path, run_json):
    hosts = write(tmp_path / "hosts", "gpu-box-7 slots=2\n")
    code, out, _ = launch(capsys, "--config", run_json, "--hostfile", hosts, "--dry-run", "--json")
    assert code == 0 and "--force_multi" in json.loads(out)["command"]
    hosts = write(tmp_path / "hosts", "localhost slots=2\n")
    code, out, _ = launch(capsys, "--config", run_json, "--hostfile", hosts, "--dry-run", "--json")
    assert code == 0 and "--force_multi" not in json.loads(out)["command"]


def test_deepspeed_env_file(capsys, tmp_path, run_json, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no user ~/.deepspeed_env in the way
    write(tmp_path / "sa.json", "{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "sa.json")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9023")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    monkeypatch.setenv("NEOX_DEEPSPEED_LOG_LEVEL", "INFO")
    monkeypatch.setenv("NCCL_BAD", "$(rm -rf /)")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    code, _, err = launch(capsys, "--config", run_json, "--gpus", "1", "--dry-run")
    assert code == 0, err
    text = (tmp_path / "ckpt" / "launch" / ".deepspeed_env").read_text()
    lines = text.splitlines()
    # DeepSpeed's format: KEY=VALUE lines only (it splits at the first '=' and fails on anything
    # else).
    assert lines and all("=" in line and not line.startswith("#") for line in lines)
    env = dict(line.split("=", 1) for line in lines)
    assert env["PATH"].split(":")[0] == str(BIN)
    assert env["PYTHONPATH"].split(":")[:2] == [str(tmp_path), str(REPO)]
    # absolute: the nodes start elsewhere
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == str(tmp_path / "sa.json")
    assert env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:9023"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_IB_DISABLE"] == "1"
    assert env["NEOX_DEEPSPEED_LOG_LEVEL"] == "INFO"
    assert "NCCL_BAD" not in env and "UNRELATED_SECRET" not in env
    assert "NCCL_BAD not forwarded" in err


def test_users_own_deepspeed_env_is_merged(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    write(home / ".deepspeed_env", "NCCL_SOCKET_IFNAME=ib0\nCUSTOM_FLAG=1\n")
    env, notes = deepspeed_env(
        {"HOME": str(home), "PATH": "/usr/bin", "NCCL_SOCKET_IFNAME": "eth0"}, tmp_path)
    # written on purpose: it wins
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["CUSTOM_FLAG"] == "1"
    assert any(".deepspeed_env" in n for n in notes)


# -- pre-flight ------------------------------------------------------------------------------------
def test_check_single_node(capsys, run_json):
    code, out, err = launch(capsys, "--config", run_json, "--gpus", "2", "--check", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    names = [c["name"] for c in report["checks"]]
    assert names[:4] == ["torch / CUDA", "GPUs", "bf16", "DeepSpeed ops"]
    assert {"hosts", "disk", "bucket"} <= set(names)
    assert report["ok"] and all(c["status"] in ("pass", "skip") for c in report["checks"])


def test_check_table_text(capsys, run_json):
    code, out, _ = launch(capsys, "--config", run_json, "--gpus", "1", "--check")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert lines[-1].startswith("pre-flight: ") and "0 failed" in lines[-1]


def test_check_bucket_writable(capsys, tmp_path, run_json, gcs_bucket):
    code, out, _ = launch(capsys, "--config", run_json, "--gpus", "1", "--check", "--json",
                          "--sync-to", f"gs://{gcs_bucket}/run")
    bucket = {c["name"]: c for c in json.loads(out)["checks"]}["bucket"]
    assert (code == 0 and bucket["status"] == "pass"
            and "probe object written and deleted" in bucket["detail"])


def test_check_bucket_missing_fails_with_a_fix(capsys, tmp_path, run_json, gcs_bucket):
    code, out, _ = launch(capsys, "--config", run_json, "--gpus", "1", "--check", "--json",
                          "--sync-to", f"gs://{gcs_bucket}-missing/run")
    report = json.loads(out)
    bucket = {c["name"]: c for c in report["checks"]}["bucket"]
    assert code == 1 and not report["ok"]
    assert bucket["status"] == "fail" and f"{gcs_bucket}-missing" in bucket["detail"]
    assert "GOOGLE_APPLICATION_CREDENTIALS" in bucket["fix"]


def test_check_unreachable_host_row(capsys, tmp_path, run_json):
    hosts = write(tmp_path / "hosts", "unreachable-host.invalid slots=1\n")
    code, out, _ = launch(capsys, "--config", run_json, "--hostfile", hosts, "--check", "--json")
    rows = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 1
    assert rows["host unreachable-host.invalid"]["status"] == "fail"
    assert "ssh-copy-id unreachable-host.invalid" in rows["host unreachable-host.invalid"]["fix"]


def test_check_disk_for_n_checkpoints(capsys, tmp_path):
    """Production keeping every checkpoint (21 of ~18 GiB): pass or fail exactly as the free space
    says."""
    run = write(tmp_path / "prod.json", json.dumps({"base": "production", "keep_last_n": 0,
                                                    "save_dir": str(tmp_path / "ckpt"),
                                                    "data_dir": str(tmp_path)}))
    code, out, _ = launch(capsys, "--config", run, "--gpus", "1", "--check", "--json")
    disk = {c["name"]: c for c in json.loads(out)["checks"]}["disk"]
    need = 21 * 1_414_647_808 * (2 + 12)  # bf16 weights + fp32 master and two Adam moments
    free = shutil.disk_usage(tmp_path).free
    assert "21 checkpoint(s) of 18.4 GiB" in disk["detail"]
    assert disk["status"] == ("fail" if free < need else "pass")
    if free < need:
        assert code == 1 and "keep_last_n" in disk["fix"]


def test_checkpoint_size_and_count():
    from neox_train.config import load_run_config

    run = load_run_config("production")
    assert preflight.checkpoints_kept(run) == 4  # keep_last_n 3 + the one being written
    # 10000 / 500 saves + the final one
    assert preflight.checkpoints_kept(run.replace(keep_last_n=0)) == 21
    assert preflight.checkpoints_kept(run.replace(keep_last_n=50)) == 21


def test_needed_ops():
    base = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "zero_optimization": {"stage": 2}}
    assert preflight.needed_ops(base, on_gpu=True) == []
    offload = {**base, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert preflight.needed_ops(offload, on_gpu=True) == ["CPUAdamBuilder"]
    fused = {**base, "optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}
    assert preflight.needed_ops(fused, on_gpu=True) == ["FusedAdamBuilder"]


# -- start_training.sh -----------------------------------------------------------------------------
SCRIPT = REPO / "launcher" / "start_training.sh"


def start_training(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_start_training_keeps_the_seed_interface(tmp_path, run_json):
    proc = start_training("--config", run_json, "--gpus", "2", "--max-steps", "5", "--resume",
                          "latest", "--no-background-upload", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip()
    assert "deepspeed --num_gpus 2 " in command
    for part in (f"--config {run_json}", "--max-steps 5", "--resume latest",
                 "--no-background-upload"):
        assert part in command
    # Defaults: --config production and one GPU.
    proc = start_training("--dry-run", "--save-dir", tmp_path / "p", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--num_gpus 1 " in proc.stdout and "--config production" in proc.stdout


def test_start_training_bad_input(tmp_path):
    proc = start_training("--gpus", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "start_training.sh: error: --gpus needs a value (see --help)")


# -- OpenMPI / SLURM: ranks from mpirun's and srun's own variables ---------------------------------
@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
def test_mpi_runners_get_the_rendezvous_in_deepspeed_env(capsys, tmp_path, run_json, monkeypatch,
                                                         launcher):
    """DeepSpeed's OpenMPI and SLURM runners export .deepspeed_env to every rank but set no
    MASTER_ADDR: the launch folder carries it (the first host, or --master-addr) with the port."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    hosts = write(tmp_path / "hosts", "gpu-a slots=2\ngpu-b slots=2\n")
    code, _, err = launch(capsys, "--config", run_json, "--hostfile", hosts, "--launcher", launcher,
                          "--dry-run")
    assert code == 0, err
    env = (tmp_path / "ckpt" / "launch" / ".deepspeed_env").read_text().splitlines()
    assert "MASTER_ADDR=gpu-a" in env and "MASTER_PORT=29500" in env
    assert "ranks meet at MASTER_ADDR=gpu-a MASTER_PORT=29500" in err
    code, _, err = launch(capsys, "--config", run_json, "--hostfile", hosts, "--launcher", launcher,
                          "--dry-run", "--master-addr", "10.0.0.5", "--master-port", "29601")
    env = (tmp_path / "ckpt" / "launch" / ".deepspeed_env").read_text().splitlines()
    assert code == 0 and "MASTER_ADDR=10.0.0.5" in env and "MASTER_PORT=29601" in env
    # pdsh goes through DeepSpeed's own launcher, which sets them itself.
    code, _, err = launch(capsys, "--config", run_json, "--hostfile", hosts, "--dry-run")
    assert (code == 0
            and "MASTER_ADDR" not in (tmp_path / "ckpt" / "launch" / ".deepspeed_env").read_text())


OMPI_RANK1 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
              "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
              "MASTER_ADDR": "gpu-a"}
SRUN_RANK3 = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": "4",
              "MASTER_ADDR": "gpu-a", "MASTER_PORT": "29601"}


def test_launcher_env_reads_mpirun_and_srun():
    from neox_train.distributed import Topology, launcher_env

    got = launcher_env(OMPI_RANK1)
    assert got == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu-a", "MASTER_PORT": "29500"}
    got = launcher_env(SRUN_RANK3)
    assert got == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1",
                   "CROSS_SIZE": "2", "MASTER_ADDR": "gpu-a", "MASTER_PORT": "29601"}
    # Topology (who uploads, which node) follows from them.
    for env, node in ((OMPI_RANK1, 0), (SRUN_RANK3, 1)):
        with pytest.MonkeyPatch.context() as mp:
            for key in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
                mp.delenv(key, raising=False)
            for key, value in launcher_env(env).items():
                mp.setenv(key, value)
            topo = Topology.from_env()
            assert (topo.local_rank, topo.node_rank, topo.num_nodes) == (1, node, 2)


def test_launcher_env_leaves_other_starts_alone():
    from neox_train.distributed import launcher_env

    # DeepSpeed's launcher already set everything
    assert launcher_env({"RANK": "0", **OMPI_RANK1}) == {}
    assert launcher_env({}) == {}  # a plain single process
    # An sbatch script is one process although the job has 4 tasks: no SLURM_STEP_* variables there.
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}) == {}
    single = launcher_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1",
                           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    assert single["WORLD_SIZE"] == "1" and single["MASTER_ADDR"] == "127.0.0.1"


def test_launcher_env_without_master_addr_isone_line():
    from neox_train.distributed import launcher_env
    from neox_train.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        launcher_env({k: v for k, v in OMPI_RANK1.items() if k != "MASTER_ADDR"})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "started by mpirun (Open MPI) as rank 1 of 4, but MASTER_ADDR is not set")
    assert "neox-launch" in message and "--master-addr" in message


def test_code_fingerprint_sees_every_sub_package(tmp_path):
    """Pre-flight compares nodes by this hash: a change in any module of any sub-package must change
    it (it globbed the top folder only, which after the move into sub-packages held almost no
    code)."""
    import neox_train

    copy = tmp_path / "neox_train"
    shutil.copytree(Path(neox_train.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = preflight.code_fingerprint(copy)
    assert preflight.code_fingerprint(copy) == before
    commit_py = copy / "checkpoint" / "local" / "commit.py"
    commit_py.write_text(commit_py.read_text() + "\n# changed\n")
    assert preflight.code_fingerprint(copy) != before
    assert (preflight.code_fingerprint()
            == preflight.code_fingerprint(Path(neox_train.__file__).parent))
