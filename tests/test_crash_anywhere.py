"""Crash anywhere: kill -9 the trainer at seeded random moments across saves and uploads (a real
SIGKILL of the real process, its upload worker dying with it), restart it the way an operator or a
supervisor would, and after every kill check what a careful user relies on:

- the local `latest`, when there is one, names a complete tag whose files all match its marker;
- the restart resumes from the newest complete tag (when it gets that far before the next kill);
- the bucket's `latest`, when there is one, names a COMPLETE tag, and every COMPLETE tag's files
  match its manifest;
- every loss any attempt logged equals the uninterrupted run's loss at that step (exact resume), and
  the last attempt finishes the run with every remaining checkpoint published.

Each suite run takes a sample: a new seed every run (printed, and in every failure message),
NEOX_CRASH_KILLS kills (default 6). The seed decides every kill moment, so NEOX_CRASH_SEED=<seed>
aims at the same points again (timing still varies a little), and
NEOX_CRASH_MOMENT=start-up|saves|uploads aims every kill at one kind of moment. The full campaign of
the last issues: NEOX_CRASH_KILLS=20.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from neox_train.checkpoint.local import commit

from conftest import BIN, read_metrics, run_train, test_ds_config, tiny_run_config, train_env
from gcs import direct_client, gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

STEPS = 40
SEED = int(os.environ.get("NEOX_CRASH_SEED") or random.SystemRandom().randrange(10**8))
# fresh runs, each killed until it ends, until this many
MIN_KILLS = int(os.environ.get("NEOX_CRASH_KILLS", "6"))
# start-up, saves or uploads: only that kind of moment
MOMENT = os.environ.get("NEOX_CRASH_MOMENT", "")
MIN_CAMPAIGNS, MAX_CAMPAIGNS = 1, 5
KILLS_PER_CAMPAIGN = 14
REPRODUCE = f"(reproduce: NEOX_CRASH_SEED={SEED} NEOX_CRASH_KILLS={MIN_KILLS})"
START_TIMEOUT_S = 120


def run_values(tmp: Path, token_dir: Path, **kw) -> Path:
    # Save (and publish) every step: most moments of the run are inside a save, a commit or an
    # upload. Sequences of 128 tokens make a step ~0.1 s, so the training part of an attempt lasts
    # long enough to be hit.
    return tiny_run_config(tmp, token_dir, ds_config=str(test_ds_config(tmp, 0)), max_steps=STEPS,
                           save_steps=1, log_steps=1, eval_steps=0, keep_last_n=2, seq_len=128,
                           micro_batch=8, **kw)


def logged_losses(log_dir: Path) -> list[tuple[int, float]]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut in half
        if record.get("kind") == "train":
            out.append((record["step"], record["loss"]))
    return out


def check_local(save: Path) -> str | None:
    """The local invariant; returns the newest complete tag (what a restart must resume from)."""
    tag, _ = commit.read_latest(save)
    if tag is not None:
        status = commit.inspect(save, tag)
        assert status.complete, f"local latest names {tag}, which is not complete: {status.problem}"
        assert commit.verify(save, status) == "", f"local latest names {tag}, which is damaged"
    # (latest may be one behind the newest complete tag: a kill between a marker and the pointer.)
    complete = commit.complete_tags(save)
    return complete[-1] if complete else None


def check_bucket(emulator_url: str, bucket: str, prefix: str) -> list[str]:
    """The remote invariant; returns the COMPLETE tags."""
    client = direct_client(emulator_url)
    listing = {b.name[len(prefix) + 1:]: b for b in client.list_blobs(bucket, prefix=prefix + "/")}
    complete = sorted((n.split("/")[0] for n in listing
                       if n.endswith("/COMPLETE") and n.count("/") == 1),
                      key=lambda t: int(t[11:]))
    for tag in complete:
        manifest = json.loads(
            client.bucket(bucket).blob(f"{prefix}/{tag}/manifest.json").download_as_bytes())
        for rel, meta in manifest["files"].items():
            blob = listing.get(f"{tag}/{rel}")
            assert (blob is not None and int(blob.size) == meta["size"]
                    and blob.crc32c == meta["crc32c"]), \
                f"COMPLETE {tag}/{rel} does not match its manifest"
    if "latest" in listing:
        named = listing["latest"].download_as_bytes().decode().strip()
        assert named in complete, \
            f"the bucket's latest names {named}, which is not COMPLETE ({complete})"
    return complete


def wait_for_step(log_dir: Path, before: int, step: int, proc: subprocess.Popen) -> bool:
    """Until the attempt has logged `step` (its save starts right after), or it exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if any(s >= step for s, _ in logged_losses(log_dir)[before:]):
            return True
        time.sleep(0.002)
    return False


def survivors(pgid: int, timeout_s: float = 10.0) -> list[str]:
    """The live (non-zombie) processes left in the killed trainer's process group after timeout_s
    (none: [])."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in psutil.process_iter(["status", "cmdline"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.info["cmdline"] or [])[:200])
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def wait_for_text(path: Path, texts: tuple[str, ...], proc: subprocess.Popen) -> None:
    """Until the attempt's stderr shows one of `texts` (its uploads are under way), or it exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if any(t in path.read_text(errors="replace") for t in texts):
            return
        time.sleep(0.01)


def test_kill9_anywhere_leaves_only_complete_checkpoints_and_exact_losses(
        tmp_path, token_dir, gcs_emulator, gcs_bucket):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    run_train(["--config", str(run_values(reference_dir, token_dir))])
    reference = {
        step: record["loss"] for step, record in read_metrics(reference_dir / "logs").items()}
    assert sorted(reference) == list(range(1, STEPS + 1))

    assert MOMENT in ("", "start-up", "saves", "uploads"), \
        f"NEOX_CRASH_MOMENT={MOMENT}: start-up, saves or uploads"
    print(f"crash-anywhere: seed {SEED} {REPRODUCE}")
    rng = random.Random(SEED)
    env = train_env()
    kills = 0
    moments = {"start-up": 0, "saves": 0, "uploads": 0}  # where the kills were aimed
    campaign = -1
    while campaign + 1 < MIN_CAMPAIGNS or (kills < MIN_KILLS and campaign + 1 < MAX_CAMPAIGNS):
        campaign += 1
        tmp = tmp_path / f"campaign{campaign}"
        tmp.mkdir()
        prefix = f"run{campaign}"
        run = run_values(tmp, token_dir, sync_to=f"gs://{gcs_bucket}/{prefix}")
        save, log_dir = tmp / "ckpt", tmp / "logs"
        for attempt in range(KILLS_PER_CAMPAIGN + 1):
            newest = check_local(save)
            remote = check_bucket(gcs_emulator.url, gcs_bucket, prefix)
            args = ["--config", str(run)] + (["--resume", "latest"] if newest or remote else [])
            before = len(logged_losses(log_dir))
            err_path = tmp / f"attempt{attempt}.err"
            with open(err_path, "w") as err:
                proc = subprocess.Popen([str(BIN / "neox-train"), *args], env=env,
                                        stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True)
            last_attempt = attempt == KILLS_PER_CAMPAIGN
            try:
                if not last_attempt:
                    where = rng.random()
                    where = {"start-up": 0.0, "saves": 0.5, "uploads": 0.9}.get(MOMENT, where)
                    if where < 0.15:
                        # during start-up: resume, download, claim
                        time.sleep(rng.uniform(0.5, 4.0))
                        moments["start-up"] += 1
                    elif where < 0.7:
                        done = max([s for s, _ in logged_losses(log_dir)] or [0])
                        # A few steps on: each attempt advances a little, so a run is hit many times
                        # before it ends.
                        target = min(done + rng.randint(1, 2), STEPS)
                        wait_for_step(log_dir, before, target, proc)
                        # somewhere in the save, the commit, the hand-off
                        time.sleep(rng.uniform(0.0, 0.08))
                        moments["saves"] += 1
                    else:
                        wait_for_text(err_path, ("sync: published", "pending upload(s)"), proc)
                        # somewhere in an upload, a finalize, a retention
                        time.sleep(rng.uniform(0.0, 0.15))
                        moments["uploads"] += 1
                    if proc.poll() is None:
                        # the trainer only: its upload worker must die with it
                        os.kill(proc.pid, signal.SIGKILL)
                        kills += 1
                proc.wait(timeout=START_TIMEOUT_S)
                left = survivors(proc.pid)
                assert not left, f"processes of the killed trainer outlived it: {left} {REPRODUCE}"
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            stderr = err_path.read_text()
            if newest and "resumed from" in stderr:
                assert f"resumed from {save / newest}" in stderr, f"{REPRODUCE}\n{stderr[-3000:]}"
            assert "Traceback" not in stderr, f"{REPRODUCE}\n{stderr[-3000:]}"
            for step, loss in logged_losses(log_dir)[before:]:
                assert loss == pytest.approx(reference[step], abs=1e-6), \
                    (campaign, attempt, step, REPRODUCE)
            if proc.returncode == 0:
                break
            assert proc.returncode == -signal.SIGKILL, \
                f"attempt {attempt} exited {proc.returncode} {REPRODUCE}: {stderr[-3000:]}"
        else:
            pytest.fail(f"campaign {campaign} never finished {REPRODUCE}")
        assert proc.returncode == 0
        assert check_local(save) == f"global_step{STEPS}"
        published = check_bucket(gcs_emulator.url, gcs_bucket, prefix)
        assert published[-1] == f"global_step{STEPS}"
        # Nothing complete stays unpublished; retention kept the newest two.
        assert set(commit.complete_tags(save)) <= set(published)
        assert len(commit.complete_tags(save)) == 2
        steps_logged = {s for s, _ in logged_losses(log_dir)}
        assert steps_logged == set(range(1, STEPS + 1))
    assert kills >= MIN_KILLS, f"only {kills} kills landed ({moments}) {REPRODUCE}"
    print(f"crash-anywhere: {kills} kills over {campaign + 1} runs, aimed at {moments} {REPRODUCE}")
