"""Runs and the prefix they publish to: every run has an id (in its manifests, its tags and the
prefix's owner object); another run on an owned prefix is refused at start-up; a resumed run keeps
its id; a run that can no longer publish stops before its disk fills; retention and the resume
source look at what is verified remote, not only at what this process did; every retried storage
request is counted."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, read_metrics, run_train, test_ds_config, tiny_run_config, train_env
from gcs import FaultProxy, gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow  # real training processes


def run_config(tmp: Path, token_dir: Path, bucket: Path | str, **kw) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    values = dict(ds_config=str(test_ds_config(tmp, 0)), max_steps=4, save_steps=2, keep_last_n=0,
                  sync_to=str(bucket))
    values.update(kw)
    return tiny_run_config(tmp, token_dir, **values)


def published(bucket: Path) -> list[str]:
    return sorted((p.parent.name for p in bucket.glob("global_step*/COMPLETE")),
                  key=lambda t: int(t[11:]))


def manifest_run_id(bucket: Path, tag: str) -> str:
    return json.loads((bucket / tag / "manifest.json").read_text())["run_id"]


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- defect 3: run identity ------------------------------------------------------------------------
def test_another_run_on_an_owned_prefix_is_refused_until_it_takes_over(tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    first = run_config(tmp_path / "a", token_dir, bucket)
    run_train(["--config", str(first)])
    assert published(bucket) == ["global_step2", "global_step4"]
    owner = manifest_run_id(bucket, "global_step4")
    assert manifest_run_id(bucket, "global_step2") == owner and len(owner) == 12
    assert json.loads((bucket / ".neox-owner.json").read_text())["run_id"] == owner

    second = run_config(tmp_path / "b", token_dir, bucket, max_steps=3, save_steps=3)
    before = tree(bucket)
    proc = run_train(["--config", str(second)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert (line.startswith("neox-train: error:") and owner in line and "--resume" in line
            and "--takeover" in line)
    assert tree(bucket) == before, "the refused run wrote into the prefix"
    assert not (tmp_path / "b" / "ckpt").exists()

    proc = run_train(["--config", str(second), "--takeover"])
    assert published(bucket) == ["global_step2", "global_step3", "global_step4"]
    taker = manifest_run_id(bucket, "global_step3")
    assert (taker != owner
            and json.loads((bucket / ".neox-owner.json").read_text())["run_id"] == taker)
    assert any(" WARNING " in line and owner in line for line in proc.stderr.splitlines())
    # The other run's published checkpoints are untouched.
    assert {k: v for k, v in tree(bucket).items()
            if k.startswith(("global_step2/", "global_step4/"))} == \
        {k: v for k, v in before.items() if k.startswith(("global_step2/", "global_step4/"))}


def test_a_resumed_run_keeps_its_id(tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    run = run_config(tmp_path, token_dir, bucket)
    run_train(["--config", str(run)])
    owner = manifest_run_id(bucket, "global_step4")
    run_train(["--config", str(run), "--resume", "latest", "--max-steps", "6"])
    assert (published(bucket)[-1] == "global_step6"
            and manifest_run_id(bucket, "global_step6") == owner)
    # On a new machine, from the bucket: the same id again.
    run_train(["--config", str(run), "--save-dir", str(tmp_path / "fresh"), "--log-dir",
               str(tmp_path / "logs2"), "--resume", "latest", "--max-steps", "8"])
    assert manifest_run_id(bucket, "global_step8") == owner


# -- defect 5: a run that can no longer publish stops before its disk fills ------------------------
def test_a_run_that_cannot_publish_stops_after_max_unpublished_checkpoints(tmp_path, token_dir):
    """Another run takes the prefix over right after this one claimed it (a double launch): every
    publication is refused for good. The run gives each such checkpoint up (an ERROR line each),
    keeps it locally, reports sync/failed, and stops once more than 2 are unpublished, instead of
    filling the disk for days."""
    import time

    bucket = tmp_path / "bucket"
    # Long sequences: a few hundred milliseconds a step, so the run is still going when the worker
    # is up.
    run = run_config(tmp_path, token_dir, bucket, max_steps=400, save_steps=2, log_steps=1,
                     eval_steps=0, seq_len=256, micro_batch=8, max_unpublished_checkpoints=2)
    trainer = subprocess.Popen([str(BIN / "neox-train"), "--config", str(run)], env=train_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    owner_file = bucket / ".neox-owner.json"
    deadline = time.monotonic() + 120
    while not owner_file.is_file() and time.monotonic() < deadline and trainer.poll() is None:
        time.sleep(0.01)
    other = {**json.loads(owner_file.read_text()), "run_id": "0123456789ab",
             "session": "ffffffffffff"}
    owner_file.write_text(json.dumps(other))
    _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert (line.startswith("neox-train: error:")
            and "max_unpublished_checkpoints" in line), err[-3000:]
    assert "0123456789ab" in line, err[-3000:]
    errors = [ln for ln in err.splitlines() if " ERROR " in ln and "sync:" in ln]
    assert len(errors) >= 3, err[-3000:]
    steps = read_metrics(tmp_path / "logs")
    assert max(steps) < 400
    sync = read_metrics(tmp_path / "logs", "sync")
    assert sync[max(sync)]["failed"] >= 3
    local = sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
    assert (len(local) >= 3
            and published(bucket) == []), "checkpoints that could not be published must stay local"
    assert other == json.loads(owner_file.read_text()), "the run overwrote the new owner"


# -- defect 9: retention across restarts -----------------------------------------------------------
def test_retention_deletes_what_an_earlier_process_published(tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    run = run_config(tmp_path, token_dir, bucket, max_steps=6, keep_last_n=2)
    run_train(["--config", str(run)])
    assert (sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
            == ["global_step4", "global_step6"])
    run_train(["--config", str(run), "--resume", "latest", "--max-steps", "10"])
    assert published(bucket) == [f"global_step{s}" for s in (2, 4, 6, 8, 10)]
    assert (sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
            == ["global_step10", "global_step8"])


# -- defect 10: a stale save dir and a newer bucket ------------------------------------------------
def test_resume_latest_takes_the_newer_published_checkpoint_over_a_stale_save_dir(
        tmp_path, token_dir):
    bucket = tmp_path / "bucket"
    run = run_config(tmp_path, token_dir, bucket, max_steps=6)
    run_train(["--config", str(run)])
    straight = read_metrics(tmp_path / "logs")
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copytree(tmp_path / "ckpt" / "global_step2", stale / "global_step2")
    (stale / "latest").write_text("global_step2")
    log_dir = tmp_path / "logs-resumed"
    proc = run_train(["--config", str(run), "--save-dir", str(stale), "--log-dir", str(log_dir),
                      "--resume", "latest", "--max-steps", "8"])
    assert f"resumed from {stale / 'global_step6'}" in proc.stderr, proc.stderr[-3000:]
    said = [ln for ln in proc.stderr.splitlines() if "global_step2" in ln and "global_step6" in ln]
    assert said, \
        "the choice between the stale local checkpoint and the bucket's newer one was not reported"
    resumed = read_metrics(log_dir)
    assert sorted(resumed) == [7, 8]
    # Same data position as the uninterrupted run had at step 6: step 7's loss follows from step 6's
    # state.
    assert all(r["consumed_samples"] > straight[6]["consumed_samples"] for r in resumed.values())


# -- defect 11: every retried request is counted ---------------------------------------------------
def test_sync_retries_count_every_retried_request(tmp_path, token_dir, gcs_emulator, gcs_bucket):
    url = f"gs://{gcs_bucket}/run"
    run = run_config(tmp_path, token_dir, url, max_steps=4, save_steps=2)
    rules = {r"^POST /upload/": ["503", "pass", "503", "pass", "pass", "503"] * 5,
             r"^GET /storage/v1/b/[^/]+/o\?": ["503", "pass", "pass"] * 5,
             r"alt=media": ["503", "pass"] * 5}
    with FaultProxy(gcs_emulator.url, rules=rules, lifetime_s=240) as proxy:
        env = train_env()
        env["STORAGE_EMULATOR_HOST"] = proxy.url
        proc = subprocess.run([str(BIN / "neox-train"), "--config", str(run)], capture_output=True,
                              text=True, env=env, timeout=240)
        injected = proxy.counts["503"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert injected >= 10
    sync = read_metrics(tmp_path / "logs", "sync")
    assert sync[max(sync)]["retries"] == injected
