"""Training with checkpoint sync: the background worker publishes (manifest, COMPLETE, latest),
retention waits for verified-remote, a failed bucket makes the run exit non-zero, and the journal
finishes uploads after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    BIN,
    copy_checkpoint,
    read_metrics,
    run_train,
    test_ds_config,
    tiny_run_config,
    train_env,
)

pytestmark = pytest.mark.slow


def bucket_tags(bucket: Path) -> list[str]:
    return sorted((p.parent.name for p in bucket.glob("global_step*/COMPLETE")),
                  key=lambda t: int(t[11:]))


def test_background_sync_to_folder_publishes_and_retention_waits(tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=6, save_steps=2, keep_last_n=1, sync_to=str(bucket))
    proc = run_train(["--config", str(run)])
    assert bucket_tags(bucket) == ["global_step2", "global_step4", "global_step6"]
    assert (bucket / "latest").read_text().strip() == "global_step6"
    manifest = json.loads((bucket / "global_step6" / "manifest.json").read_text())
    local = {p.relative_to(tmp_path / "ckpt" / "global_step6").as_posix()
             for p in (tmp_path / "ckpt" / "global_step6").rglob("*") if p.is_file()}
    assert set(manifest["files"]) == local - {".neox-complete.json"}  # the local marker stays local
    # Local retention kept only the newest, and only after the older ones were verified remote.
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*")) == ["global_step6"]
    sync = read_metrics(tmp_path / "logs", "sync")
    assert sync[max(sync)]["last_published_step"] == 6 and sync[max(sync)]["pending"] == 0
    assert (sync[max(sync)]["retries"] == 0 and sync[max(sync)]["bytes_uploaded"] > 0
            and sync[max(sync)]["lag_s"] > 0)
    stalls = read_metrics(tmp_path / "logs", "checkpoint")
    assert sorted(stalls) == [2, 4, 6] and all(r["stall_s"] > 0 for r in stalls.values())
    assert "sync: published global_step6" in proc.stderr


def test_inline_upload_mode(tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    run = tiny_run_config(tmp_path, token_dir, max_steps=4, save_steps=2, sync_to=str(bucket))
    proc = run_train(["--config", str(run), "--no-background-upload"])
    assert bucket_tags(bucket) == ["global_step2", "global_step4"]
    assert "inline" in proc.stderr


def test_resume_from_bucket_folder_matches_local_resume(tmp_path, token_dir):
    """A fresh machine (no local checkpoints) resumes from the bucket with the same next losses."""
    bucket = tmp_path / "bucket"
    run = tiny_run_config(tmp_path, token_dir, max_steps=6, save_steps=3, keep_last_n=0,
                          sync_to=str(bucket))
    run_train(["--config", str(run)])
    straight = read_metrics(tmp_path / "logs")
    # Make the bucket's newest COMPLETE checkpoint step 3: forget step 6 there.
    (bucket / "global_step6" / "COMPLETE").unlink()
    (bucket / "latest").write_text("global_step3")
    fresh = tmp_path / "fresh"
    run_train(["--config", str(run), "--save-dir", str(fresh), "--log-dir", str(tmp_path / "logs2"),
               "--resume", "latest", "--max-steps", "6"])
    resumed = read_metrics(tmp_path / "logs2")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-6)
    # The download is published already (it came from sync_to, checked against its manifest): the
    # journal says so first, and the upload process never takes it for an unfinished upload.
    journal = [json.loads(line) for line in
               (fresh / ".neox-sync" / "journal-node0.jsonl").read_text().splitlines()]
    assert journal[0]["published"] == "global_step3"
    assert not any(r.get("queued") == "global_step3" for r in journal), journal


def test_unreachable_bucket_fails_before_training(tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir, sync_to="gs://no-such-bucket-neox/ckpt")
    env = train_env()
    env["STORAGE_EMULATOR_HOST"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    out = subprocess.run([str(BIN / "neox-train"), "--config", str(run)], capture_output=True,
                         text=True, env=env, timeout=180)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("neox-train: error:")
    assert not (tmp_path / "ckpt").exists()


# --- GCS (the real client against gcp-storage-emulator, through a fault proxy where the test needs
# faults) ---------

from gcs import FaultProxy, direct_client, gcs_bucket, gcs_emulator  # noqa: E402,F401


def gcs_complete_tags(emulator_url: str, bucket: str, prefix: str) -> list[str]:
    names = [b.name for b in direct_client(emulator_url).list_blobs(bucket, prefix=prefix + "/")]
    tags = [n.split("/")[-2] for n in names if n.endswith("/COMPLETE")]
    return sorted(tags, key=lambda t: int(t[11:]))


def test_two_process_sync_to_gcs_and_resume_from_bucket(tmp_path, token_dir, gcs_emulator,
                                                        gcs_bucket):
    url = f"gs://{gcs_bucket}/run"
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          mixed_precision="bf16", max_steps=6, save_steps=3, keep_last_n=0,
                          sync_to=url)
    run_train(["--config", str(run)], nprocs=2)
    assert (gcs_complete_tags(gcs_emulator.url, gcs_bucket, "run")
            == ["global_step3", "global_step6"])
    straight = read_metrics(tmp_path / "logs")

    # Local resume from step 3 (the reference; not synced: its step 6 must not collide with the
    # published one) ...
    local = tmp_path / "local"
    copy_checkpoint(tmp_path / "ckpt", local, "global_step3")
    (tmp_path / "ref").mkdir()
    ref = tiny_run_config(tmp_path / "ref", token_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          mixed_precision="bf16", max_steps=6, save_steps=3, keep_last_n=0)
    run_train(["--config", str(ref), "--save-dir", str(local), "--log-dir",
               str(tmp_path / "logs-local"), "--resume", "latest"], nprocs=2)
    # ... and a fresh machine resuming from the bucket, whose newest COMPLETE checkpoint is made
    # step 3.
    client = direct_client(gcs_emulator.url)
    client.bucket(gcs_bucket).blob("run/global_step6/COMPLETE").delete()
    client.bucket(gcs_bucket).blob("run/latest").upload_from_string(b"global_step3")
    fresh = tmp_path / "fresh"
    proc = run_train(["--config", str(run), "--save-dir", str(fresh), "--log-dir",
                      str(tmp_path / "logs-bucket"), "--resume", url], nprocs=2)
    assert "resume: downloading global_step3" in proc.stderr
    from_local, from_bucket = (read_metrics(tmp_path / "logs-local"),
                               read_metrics(tmp_path / "logs-bucket"))
    assert sorted(from_bucket) == sorted(from_local) == [4, 5, 6]
    for step in (4, 5, 6):
        assert (from_bucket[step]["loss"] == from_local[step]["loss"]
                == pytest.approx(straight[step]["loss"], abs=1e-6))


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_kill9_during_upload_then_restart_finishes_it(tmp_path, token_dir, gcs_emulator, gcs_bucket,
                                                      monkeypatch):
    url = f"gs://{gcs_bucket}/run"
    run = tiny_run_config(tmp_path, token_dir, max_steps=4, save_steps=2, keep_last_n=0,
                          sync_to=url)
    # The probe's and the owner claim's uploads pass; every checkpoint upload then stalls and is
    # reset, again and again.
    with FaultProxy(gcs_emulator.url, rules={r"^POST /upload/": ["pass", "pass"] + ["stall"] * 500},
                    stall_s=0.5, lifetime_s=240) as proxy:
        env = train_env()
        env["STORAGE_EMULATOR_HOST"] = proxy.url
        trainer = subprocess.Popen([str(BIN / "neox-train"), "--config", str(run)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while proxy.counts["stall"] < 2 and time.monotonic() < deadline and trainer.poll() is None:
            time.sleep(0.2)
        assert proxy.counts["stall"] >= 2, "no upload reached the proxy"
        worker_pids = _children(trainer.pid)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(30)
        trainer.stderr.close()
        time.sleep(1.0)
        import psutil

        assert not [p for p in worker_pids
                    if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"], \
            "the upload worker outlived the killed trainer"
    assert gcs_complete_tags(gcs_emulator.url, gcs_bucket, "run") == []
    local_tags = sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
    assert local_tags, "the trainer was killed before its first checkpoint"

    # Restart on a healthy network: the journal re-queues what the killed run left, training resumes
    # from the newest local checkpoint and goes on.
    proc = run_train(["--config", str(run), "--resume", "latest", "--max-steps", "6"])
    assert "resuming" in proc.stderr and "unfinished upload" in proc.stderr
    newest = local_tags[-1]
    assert f"resumed from {tmp_path / 'ckpt' / newest}" in proc.stderr
    assert (gcs_complete_tags(gcs_emulator.url, gcs_bucket, "run")
            == sorted(set(local_tags) | {"global_step6"}, key=lambda t: int(t[11:])))
    # Every published file matches its manifest byte for byte (fetch verifies size and crc32c).
    from neox_train.checkpoint.publish.fetch import fetch_checkpoint
    from neox_train.remote import open_backend

    for tag in local_tags:
        fetch_checkpoint(open_backend(url), tag, tmp_path / "verify")


def test_unpublishable_checkpoints_fail_the_run_with_the_list(
    tmp_path, token_dir, gcs_emulator, gcs_bucket):
    url = f"gs://{gcs_bucket}/run"
    run = tiny_run_config(tmp_path, token_dir, max_steps=2, save_steps=2, sync_to=url,
                          upload_timeout_s=3)
    # The probe and the owner claim pass; every checkpoint upload then gets 503 (retried: a
    # transient outage).
    with FaultProxy(gcs_emulator.url, rules={r"^POST /upload/": ["pass", "pass"] + ["503"] * 1000},
                    lifetime_s=120) as proxy:
        env = train_env()
        env["STORAGE_EMULATOR_HOST"] = proxy.url
        out = subprocess.run([str(BIN / "neox-train"), "--config", str(run)], capture_output=True,
                             text=True, env=env, timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert (last.startswith("neox-train: error: 1 checkpoint(s) not published")
            and "global_step2" in last)
    assert (tmp_path / "ckpt" / "global_step2").is_dir(), \
        "an unpublished checkpoint must stay on local disk"
    assert gcs_complete_tags(gcs_emulator.url, gcs_bucket, "run") == []


def test_sigterm_saves_flushes_and_resumes(tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    run = tiny_run_config(tmp_path, token_dir, max_steps=100000, save_steps=100000, eval_steps=0,
                          log_steps=5, sync_to=str(bucket))
    trainer = subprocess.Popen([str(BIN / "neox-train"), "--config", str(run)], env=train_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            metrics.is_file() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.2)
    trainer.send_signal(signal.SIGTERM)
    _, err = trainer.communicate(timeout=120)
    assert trainer.returncode == 143, err[-3000:]
    assert "stop requested (SIGTERM)" in err
    tags = bucket_tags(bucket)
    assert len(tags) == 1  # the step the ranks stopped at (they agree after every step)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == tags[0]
    proc = run_train(["--config", str(run), "--resume", "latest", "--max-steps",
                      str(int(tags[0][11:]) + 2)])
    assert f"resumed from {tmp_path / 'ckpt' / tags[0]}" in proc.stderr


def test_the_training_bar_is_closed_before_uploads_are_flushed(tmp_path, token_dir):
    """The train bar stayed open while the end-of-run upload flush logged and drew its own bar, so
    the end of every demo printed the train bar again between (and glued onto) the upload lines."""
    bucket = tmp_path / "bucket"
    # A save every step: training outruns the upload worker's start, so uploads are pending when the
    # loop ends.
    run = tiny_run_config(tmp_path, token_dir, max_steps=6, save_steps=1, eval_steps=0,
                          sync_to=str(bucket))
    proc = run_train(["--config", str(run)])
    err = proc.stderr.replace("\r", "\n")
    flush = err.index("sync: waiting up to")
    assert "train:" not in err[flush:], err[flush - 500:]


def test_a_killed_upload_worker_is_restarted_and_the_run_publishes_everything(tmp_path, token_dir):
    """The OOM killer takes the upload process (not the trainer): training goes on, the trainer
    starts a new worker with what was unpublished, and every checkpoint ends up published."""
    import psutil

    bucket = tmp_path / "bucket"
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=8, save_steps=2, eval_steps=0, sync_to=str(bucket))
    # steps 3-8: time for the kill
    env = {**train_env(), "NEOX_FAULT": "slow@step=3,count=6,seconds=1"}
    err_path = tmp_path / "train.err"
    with open(err_path, "w") as err:
        trainer = subprocess.Popen([str(BIN / "neox-train"), "--config", str(run)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while ("sync: published global_step2" not in err_path.read_text()
                and time.monotonic() < deadline):
            assert trainer.poll() is None, err_path.read_text()[-3000:]
            time.sleep(0.1)
        workers = [c for c in psutil.Process(trainer.pid).children()
                   if "spawn_main" in " ".join(c.cmdline())
                   and "resource_tracker" not in " ".join(c.cmdline())]
        assert len(workers) == 1, [c.cmdline() for c in workers]
        workers[0].kill()
        assert trainer.wait(timeout=180) == 0, err_path.read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
    stderr = err_path.read_text()
    assert "sync: the upload worker died (killed by SIGKILL)" in stderr, stderr[-3000:]
    assert bucket_tags(bucket) == ["global_step2", "global_step4", "global_step6", "global_step8"]
    assert (bucket / "latest").read_text().strip() == "global_step8"
    sync = read_metrics(tmp_path / "logs", kind="sync")
    assert sync[max(sync)]["worker_restarts"] == 1 and sync[max(sync)]["pending"] == 0
