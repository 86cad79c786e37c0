"""Runs that heal themselves, end to end: 2 CPU ranks through the real deepspeed launcher under
`neox-launch --max-restarts N`, faults made from outside (a real kill -9, a real SIGSTOP) or landed
at an exact step by the NEOX_FAULT hook, and the same on two "nodes" over sshd + pdsh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from neox_train import health
from neox_train.checkpoint.local.commit import MARKER

from conftest import (
    BIN,
    TRAINED_SAVE_AT,
    TRAINED_STEPS,
    _free_port,
    communicate_or_kill,
    copy_checkpoint,
    read_metrics,
    run_train,
    test_ds_config,
    tiny_run_config,
    train_env,
)

pytestmark = pytest.mark.slow

HANG_S = 10  # the runs' hang_timeout_s: the watchdog's allowance between steps


def _launch(args: list, *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [str(BIN / "neox-launch"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env or train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, err = communicate_or_kill(proc, timeout)
    return proc.returncode, out + err


def _wait_for_step(proc: subprocess.Popen, status: Path, attempt: int, rank: int, step: int,
                   timeout: float = 300) -> health.RankStatus:
    """Poll the rank's status file (what the supervisor reads) until it reports `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        s = health.read_statuses(status, attempt).get(rank)
        if s is not None and s.step is not None and s.step >= step:
            return s
        time.sleep(0.1)
    raise AssertionError(f"attempt {attempt} rank {rank} never reached step {step}")


def _wait_for_checkpoint(proc: subprocess.Popen, save_dir: Path, step: int,
                         timeout: float = 120) -> None:
    """Until global_stepN is committed (its completeness marker), so a kill lands after it."""
    marker = save_dir / f"global_step{step}" / MARKER
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        assert (proc.poll() is None
                and time.monotonic() < deadline), f"global_step{step} was never committed"
        time.sleep(0.05)


def _attempts(launch_dir: Path) -> dict:
    return json.loads((launch_dir / "attempts.json").read_text())


def _slow(seconds: float, *attempts: int, steps: int = 100) -> str:
    """NEOX_FAULT: each step of these attempts takes `seconds` longer, so a kill from outside lands
    mid-run."""
    return ";".join(f"slow@step=1,count={steps},seconds={seconds},attempt={a}" for a in attempts)


def test_a_killed_rank_and_a_hung_rank_are_restarted_and_the_losses_are_exact(
        tmp_path, token_dir, trained_run):
    """Attempt 0: kill -9 of rank 1 from outside. Attempt 1: SIGSTOP of rank 0 from outside; rank
    1's watchdog finds no step within hang_timeout_s, prints its stacks, exits 75. Attempt 2
    finishes. Every logged loss equals the uninterrupted run's (the shared ZeRO-1 fp32 2-rank run of
    this very config)."""
    reference = read_metrics(trained_run(1, 2, "no") / "logs")
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 1)),
                          mixed_precision="no", max_steps=TRAINED_STEPS, save_steps=TRAINED_SAVE_AT,
                          eval_steps=TRAINED_SAVE_AT, hang_timeout_s=HANG_S)
    launch_dir, status = tmp_path / "ckpt" / "launch", tmp_path / "ckpt" / "launch" / "status"
    env = {**train_env(), "NEOX_FAULT": _slow(0.7, 0, 1)}
    proc = _launch(["--gpus", 2, "--zero", 1, "--config", run, "--max-restarts", 2,
                    "--restart-backoff-s", 1, "--master-port", _free_port()], cwd=tmp_path, env=env)
    victim = _wait_for_step(proc, status, 0, 1, TRAINED_SAVE_AT + 1)
    _wait_for_checkpoint(proc, tmp_path / "ckpt", TRAINED_SAVE_AT)
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    stopped = _wait_for_step(proc, status, 1, 0, TRAINED_SAVE_AT + 2)
    stopped_at = time.time()
    os.kill(stopped.pid, signal.SIGSTOP)
    code, out = _finish(proc)
    assert code == 0, out[-6000:]

    summary = _attempts(launch_dir)
    kinds = [a["kind"] for a in summary["attempts"]]
    assert kinds == ["crash", "hang", "done"], summary
    crash, hang, done = summary["attempts"]
    assert f"rank 1 (pid {victim.pid}" in crash["cause"] and "SIGKILL" in crash["cause"]
    assert "hang: rank 1" in hang["cause"] and f"allowance {HANG_S} s" in hang["cause"]
    stacks = (status / "attempt-1" / "rank-1.stacks.txt").read_text()
    assert "Current thread" in stacks or "most recent call first" in stacks
    # the stacks are in the job's log too
    assert "hang: rank 1" in (launch_dir / "attempt-1.log").read_text()
    for a, nxt in ((crash, hang), (hang, done)):
        assert nxt["start_step"] == TRAINED_SAVE_AT  # both restarts resumed from global_step4
        assert a["steps_lost"] == a["step"] - TRAINED_SAVE_AT >= 1
    assert summary["steps_lost"] == crash["steps_lost"] + hang["steps_lost"]

    train = read_metrics(tmp_path / "logs")
    assert sorted(train) == list(range(1, TRAINED_STEPS + 1))
    for step, record in train.items():
        assert record["loss"] == pytest.approx(reference[step]["loss"], abs=1e-5), \
            (step, record, reference[step])
    runs = read_metrics(tmp_path / "logs", "run")
    assert ([(r["restarts"], r["steps_lost"]) for r in runs.values()][-1]
            == (2, summary["steps_lost"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert ("run/restarts" in events.Tags()["scalars"]
            and "run/steps_lost" in events.Tags()["scalars"])
    print(f"\nkill -9 -> training again: {hang['first_step_at'] - killed_at:.1f} s "
          f"({crash['steps_lost']} steps lost, save_steps {TRAINED_SAVE_AT}); SIGSTOP -> training "
          f"again: {done['first_step_at'] - stopped_at:.1f} s (watchdog {HANG_S} s, "
          f"{hang['steps_lost']} steps lost)")


def test_the_same_step_failing_twice_stops_with_a_summary(tmp_path, token_dir):
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=6, save_steps=2, eval_steps=0, hang_timeout_s=HANG_S)
    env = {**train_env(), "NEOX_FAULT": "crash@step=3,rank=1"}
    started = time.monotonic()
    code, out = _finish(_launch(["--gpus", 2, "--zero", 0, "--config", run, "--max-restarts", 5,
                                 "--restart-backoff-s", 1, "--master-port", _free_port()],
                                cwd=tmp_path, env=env))
    assert code != 0
    summary = _attempts(tmp_path / "ckpt" / "launch")
    assert len(summary["attempts"]) == 2 and "without progress" in summary["result"], summary
    assert all("injected crash at step 3 on rank 1" in a["cause"] for a in summary["attempts"])
    assert "gave up: attempts 0 and 1 both failed (crash) at step 2 without progress" in out
    print(f"\nthe same step failing twice: stopped after {time.monotonic() - started:.1f} s, 2 "
          "attempts")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_to_the_supervisor_saves_once_and_never_restarts(tmp_path, token_dir, sig):
    """SIGINT is Ctrl-C (issue 20, 3): it printed KeyboardInterrupt tracebacks from every rank and
    the deepspeed runner, and saved nothing. Now it behaves as SIGTERM does, with 128 + its number
    as the exit status."""
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=10_000, save_steps=1000, eval_steps=0, log_steps=1,
                          hang_timeout_s=HANG_S)
    proc = _launch(["--gpus", 2, "--zero", 0, "--config", run, "--max-restarts", 3,
                    "--restart-backoff-s", 1, "--master-port", _free_port()], cwd=tmp_path,
                   env={**train_env(), "NEOX_FAULT": _slow(0.1, 0)})
    at = _wait_for_step(proc, tmp_path / "ckpt" / "launch" / "status", 0, 0, 5).step
    proc.send_signal(sig)  # the supervisor only: it passes it on
    code, out = _finish(proc, timeout=120)
    assert code == 128 + sig, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    summary = _attempts(tmp_path / "ckpt" / "launch")
    assert [a["kind"] for a in summary["attempts"]] == ["preempted"]
    assert not (tmp_path / "ckpt" / "launch" / "status" / "attempt-1").exists()
    tags = sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
    assert len(tags) == 1 and at <= int(tags[0].removeprefix("global_step")) <= at + 3, tags
    assert (tmp_path / "ckpt" / "latest").read_text() == tags[0]
    assert out.count(f"stop requested ({sig.name})") >= 1 and "attempt 1:" not in out


def test_a_nan_is_skipped_and_a_spike_rolls_back_and_a_resume_sees_the_same_data(
        tmp_path, token_dir):
    """2 ranks: NaN at step 3 (that update skipped), a spike at steps 6-8 (3 in a row: rollback to
    global_step4, samples of steps 5-8 skipped, the rolled-back state saved as global_step8); a
    resume from global_step8 repeats the healed run's losses."""
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 1)),
                          max_steps=12, save_steps=4, eval_steps=0, loss_spike_window=3)
    env = {"NEOX_FAULT": "nan@step=3;spike@step=6,count=3,factor=50"}
    proc = run_train(["--config", str(run)], nprocs=2, extra_env=env)
    err = proc.stderr
    assert ("step 3: update skipped on every rank: non-finite loss (nan) (1 bad step(s) in a row)"
            in err)
    assert "step 8: update skipped on every rank: loss" in err and "(3 bad step(s) in a row)" in err
    batch = 4 * 2 * 2  # micro 4 x accumulation 2 x 2 ranks
    line = next(x for x in err.splitlines() if "rollback 1:" in x)
    assert (f"back at global_step4; the data consumed since is skipped: samples [{4 * batch}, "
            f"{8 * batch}) ({4 * batch} sequences); training goes on at step 8") in line, line
    guard = read_metrics(tmp_path / "logs", "guard")
    assert (sorted(guard) == [3, 6, 7, 8] and guard[8]["rollbacks"] == 1
            and guard[8]["skipped_samples"] == 4 * batch)
    assert guard[8]["rollback_to_step"] == 4 and guard[3]["bad_loss"] is None
    train = read_metrics(tmp_path / "logs")
    # finite again
    assert all(train[s]["loss"] == train[s]["loss"] for s in (1, 2, 4, 5, 9, 10, 11, 12))
    assert train[9]["consumed_samples"] == 9 * batch  # the data position never went back

    resumed = tmp_path / "resumed"
    copy_checkpoint(tmp_path / "ckpt", resumed / "ckpt", "global_step8")
    run_train(["--config", str(run), "--resume", "latest", "--save-dir", str(resumed / "ckpt"),
               "--log-dir", str(resumed / "logs")], nprocs=2)
    again = read_metrics(resumed / "logs")
    assert sorted(again) == [9, 10, 11, 12]
    for step in again:
        assert again[step]["loss"] == pytest.approx(train[step]["loss"], abs=1e-6), step
        assert again[step]["consumed_samples"] == train[step]["consumed_samples"]


def test_two_nodes_restart_on_both_after_a_kill_on_one(ssh_cluster, tmp_path, token_dir):
    hosts = ssh_cluster.write_hostfile(tmp_path / "hostfile", slots=1)
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          max_steps=6, save_steps=2, eval_steps=0, hang_timeout_s=30)
    env = ssh_cluster.env(train_env())
    env["NEOX_FAULT"] = _slow(1.0, 0)
    proc = _launch(["--hostfile", hosts, "--launcher", "pdsh", "--master-addr", "127.0.0.1",
                    "--config", run, "--max-restarts", 2, "--restart-backoff-s", 1, "--master-port",
                    _free_port()],
                   cwd=tmp_path, env=env)
    status = tmp_path / "ckpt" / "launch" / "status"
    # rank 1 runs on node1, under its sshd
    victim = _wait_for_step(proc, status, 0, 1, 3, timeout=400)
    _wait_for_checkpoint(proc, tmp_path / "ckpt", 2)
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    code, out = _finish(proc, timeout=500)
    assert code == 0, out[-6000:]
    summary = _attempts(tmp_path / "ckpt" / "launch")
    assert [a["kind"] for a in summary["attempts"]] == ["crash", "done"], summary
    restarted = health.read_statuses(status, 1)
    assert sorted(restarted) == [0, 1] and all(s.state == health.DONE for s in restarted.values())
    assert {s.pid for s in restarted.values()}.isdisjoint({victim.pid})
    log = (tmp_path / "ckpt" / "launch" / "attempt-1.log").read_text()
    assert "node0: " in log and "node1: " in log  # the second attempt ran on both nodes again
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step6"
    train = read_metrics(tmp_path / "logs")
    assert sorted(train) == list(range(1, 7))
    print(f"\ntwo nodes: kill -9 on node1 -> training again on both: "
          f"{summary['attempts'][1]['first_step_at'] - killed_at:.1f} s, "
          f"{summary['attempts'][0]['steps_lost']} steps lost (save_steps 2)")
