"""Checkpoint publication with node-local disks, end to end through a real two-node launch.

Two "nodes" (sshd host aliases of 127.0.0.1, reached by the real `deepspeed` launcher through pdsh)
see the same save path, but on node1 it is a bind mount of another folder (a private mount
namespace): as on a cluster with node-local NVMe, each node holds only its own files of every
checkpoint (DeepSpeed's `checkpoint.use_node_local_storage`). Each node's worker uploads its own
part to the GCS emulator; rank 0 publishes (manifest, COMPLETE, latest) only once both parts are
remote. Then both local disks are wiped and the two nodes resume from the bucket.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from neox_train.checkpoint.local import commit

from conftest import (
    BIN,
    _free_port,
    read_metrics,
    run_in_own_group,
    test_ds_config,
    tiny_run_config,
    train_env,
)
from gcs import direct_client, gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from sshd import SshCluster, SshdUnavailable

pytestmark = pytest.mark.slow

TIMEOUT_S = 400


@pytest.fixture(scope="module")
def node_local_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodelocal")
    save_dir, node1_disk = root / "ckpt", root / "node1-disk"
    save_dir.mkdir()
    node1_disk.mkdir()
    try:
        cluster = SshCluster.start(root / "sshd", hosts=("node0", "node1"),
                                   private_mounts={"node1": [(node1_disk, save_dir)]})
    except SshdUnavailable as e:
        pytest.skip(f"sshd with a private mount namespace cannot run here: {e}")
    try:
        yield cluster, root, save_dir, node1_disk
    finally:
        cluster.stop()


def launch(cluster: SshCluster, root: Path, args: list[str],
           env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    hostfile = cluster.write_hostfile(root / "hostfile", slots=1)
    # pdsh starts each node's shell from a bare environment: DeepSpeed's runner exports this file's
    # lines there.
    env_file = root / "deepspeed_env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        "PATH": f"{BIN}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", **env_extra}.items()))
    env = cluster.env(train_env())
    env.update(env_extra, DS_ENV_FILE=str(env_file))
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "pdsh",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(BIN / "neox-train"), *args]
    proc = run_in_own_group(cmd, env=env, cwd=root, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def test_node_local_parts_are_published_together_and_resume_from_the_bucket(
        node_local_cluster, token_dir, gcs_emulator, gcs_bucket):
    cluster, root, save_dir, node1_disk = node_local_cluster
    ds = test_ds_config(root, 2)
    cfg = json.loads(ds.read_text())
    cfg["checkpoint"] = {"use_node_local_storage": True}
    ds.write_text(json.dumps(cfg))
    url = f"gs://{gcs_bucket}/nodelocal"
    run = tiny_run_config(root, token_dir, ds_config=str(ds), max_steps=4, save_steps=2,
                          eval_steps=0, save_dir=str(save_dir), sync_to=url, keep_last_n=0)
    env_extra = {"STORAGE_EMULATOR_HOST": gcs_emulator.url}
    launch(cluster, root, ["--config", str(run)], env_extra)

    # Node-local: each disk holds only its own rank's optimizer shard (and its own copy of the model
    # states).
    for disk, rank in ((save_dir, 0), (node1_disk, 1)):
        shards = sorted(p.name for p in (disk / "global_step4").glob("*optim_states.pt"))
        assert len(shards) == 1 and f"rank_{rank}_" in shards[0], (disk, shards)
        # each node's marker describes the files on its own disk
        for tag in ("global_step2", "global_step4"):
            assert commit.verify(disk, commit.inspect(disk, tag)) == "", (disk, tag)

    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    names = {b.name[len("nodelocal/"):] for b in bucket.list_blobs(prefix="nodelocal/")}
    for tag in ("global_step2", "global_step4"):
        assert ({f"{tag}/COMPLETE", f"{tag}/.parts/node-0.json", f"{tag}/.parts/node-1.json"}
                <= set(names))
        manifest = json.loads(bucket.blob(f"nodelocal/{tag}/manifest.json").download_as_bytes())
        shards = sorted(f for f in manifest["files"] if f.endswith("optim_states.pt"))
        assert len(shards) == 2, manifest["files"]  # both nodes' parts in one checkpoint
        for rel, meta in manifest["files"].items():
            blob = bucket.get_blob(f"nodelocal/{tag}/{rel}")
            assert (blob is not None and blob.size == meta["size"]
                    and blob.crc32c == meta["crc32c"]), rel
    assert bucket.blob("nodelocal/latest").download_as_text().strip() == "global_step4"

    # Both nodes lose their disks; the run continues from the bucket (each node fetches the
    # checkpoint).
    for disk in (save_dir, node1_disk):
        for child in disk.iterdir():
            subprocess.run(["rm", "-rf", str(child)], check=True)
    first = read_metrics(root / "logs")
    proc = launch(cluster, root, ["--config", str(run), "--max-steps", "6", "--resume", url,
                                  "--log-dir", str(root / "logs-resumed")], env_extra)
    resumed = read_metrics(root / "logs-resumed")
    assert sorted(resumed) == [5, 6], proc.stderr[-3000:]
    assert resumed[6]["consumed_samples"] == first[4]["consumed_samples"] + 2 * 4 * 2 * 2
    for disk in (save_dir, node1_disk):
        # the whole checkpoint came back
        assert len(list((disk / "global_step4").glob("*optim_states.pt"))) == 2
    assert bucket.blob("nodelocal/latest").download_as_text().strip() == "global_step6"
