"""Self-healing, the parts that need no launcher: the fault hook's spec, the loss guard's verdicts
and its update switch on a real torch optimizer, the hang watchdog in a real process (stacks, exit
code 75, status file), and the supervisor's decisions on real processes standing in for a job (they
write the ranks' status files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neox_train import health
from neox_train.config import RunConfig, from_dict
from neox_train.errors import ConfigError
from neox_train.launch import supervisor as sup
from neox_train.launch.attempts import Attempt, describe_exit, no_progress
from neox_train.train.faults import Faults, parse
from neox_train.train.guard import LossGuard, UpdateSwitch
from neox_train.train.watchdog import HangLimits, Watchdog

REPO = Path(__file__).resolve().parent.parent


# -- the fault hook --------------------------------------------------------------------------------
def test_fault_specs_parse_and_bad_ones_are_one_line():
    faults = parse("kill@step=7,rank=1; "
                   "hang@step=5,rank=0,attempt=1;nan@step=6;spike@step=10,count=3,factor=50")
    assert [(f.kind, f.step, f.rank, f.attempt) for f in faults] == [
        ("kill", 7, 1, None), ("hang", 5, 0, 1), ("nan", 6, None, None), ("spike", 10, None, None)]
    spike = faults[3]
    assert [spike.hits(s, 0, 0) for s in (9, 10, 12, 13)] == [False, True, True, False]
    assert not faults[1].hits(5, 0, 0) and faults[1].hits(5, 0, 1)
    hook = Faults(1, {"NEOX_FAULT": "nan@step=6,rank=1", "NEOX_ATTEMPT": "0"})
    assert hook.loss_factor(5) is None and hook.loss_factor(6) != hook.loss_factor(6)  # NaN
    assert not Faults(0, {})  # inert unless set
    for bad in ("explode@step=1", "kill@rank=1", "kill@step=x", "kill@step=1,when=now"):
        with pytest.raises(ConfigError, match="NEOX_FAULT=.*valid: KIND@step=N"):
            parse(bad)


# -- the loss guard --------------------------------------------------------------------------------
def _guard(**changes) -> LossGuard:
    return LossGuard(from_dict({**RunConfig().to_dict(), "loss_spike_window": 4, **changes}))


def test_the_guard_judges_non_finite_losses_and_spikes_and_counts_streaks():
    guard = _guard()
    assert guard.judge(float("nan")).bad and "non-finite" in guard.judge(float("inf")).reason
    for step, loss in enumerate([3.0, 2.9, 2.8], start=1):
        assert not guard.judge(loss * 10).bad  # the spike check waits for a full window
        guard.record(step, loss, False)
    guard.record(4, 2.7, False)
    assert not guard.judge(5.6).bad  # 2x the median 2.85 = 5.7
    verdict = guard.judge(5.8)
    assert verdict.bad and "above 2x the running median 2.8500" in verdict.reason
    assert guard.record(5, 5.8, True) is False and guard.record(6, 9.0, True) is False
    assert guard.record(7, 9.0, True) is True  # max_bad_steps=3 in a row: roll back
    assert (guard.streak, guard.streak_start, guard.skipped_updates) == (3, 5, 3)
    guard.rolled_back(64)
    assert guard.counters() == {"skipped_updates": 3, "rollbacks": 1, "skipped_samples": 64}
    # bad losses never enter the window
    assert guard.streak == 0 and list(guard.window) == [3.0, 2.9, 2.8, 2.7]
    again = _guard()
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # what a checkpoint carries
    assert again.state_dict() == guard.state_dict()
    assert not _guard(loss_spike_factor=0).judge(1e9).bad
    assert _guard(max_bad_steps=0).record(1, float("nan"), True) is False  # never roll back


@pytest.mark.parametrize("field,value,message", [
    ("loss_spike_factor", 0.5, "must be a number > 1, or 0"),
    ("hang_timeout_s", 0, "must be a number of seconds > 0"), ("max_bad_steps", -1, "must be >= 0"),
    ("loss_spike_window", 0, "must be >= 1"), ("loss_guard", "yes", "must be true or false")])
def test_bad_healing_settings_are_one_line(field, value, message):
    with pytest.raises(ConfigError, match=f"{field}=.*{message}"):
        from_dict({field: value})


def _optimizer_and_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _backward(model, scale: float = 1.0) -> None:
    model.zero_grad()
    (model(torch.ones(3, 4)).sum() * scale).backward()


def test_the_update_switch_skips_the_optimizer_and_the_schedule():
    """Plain torch optimizer (fp32 ZeRO-0's case): a skip leaves weights, Adam state and the LR
    untouched, and a non-finite gradient norm is caught by the switch itself."""
    model, opt, sched = _optimizer_and_scheduler()
    switch = UpdateSwitch(SimpleNamespace(optimizer=opt, lr_scheduler=sched))
    assert switch.check_grads
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    switch.skip = True
    opt.step()
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state and sched.last_epoch == 0
    switch.skip = False
    _backward(model, float("nan"))
    opt.step()
    sched.step()
    assert switch.skip and switch.reason == "non-finite gradient norm"
    assert (all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            and sched.last_epoch == 0)
    switch.skip = False
    _backward(model)
    opt.step()
    sched.step()
    assert (not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            and sched.last_epoch == 1)


def test_the_update_switch_finds_the_torch_optimizer_under_a_deepspeed_wrapper():
    model, opt, sched = _optimizer_and_scheduler()
    # DeepSpeed's ZeRO/bf16 optimizers keep the torch one as .optimizer
    wrapper = SimpleNamespace(optimizer=opt)
    switch = UpdateSwitch(SimpleNamespace(optimizer=wrapper, lr_scheduler=sched))
    assert not switch.check_grads  # the wrappers check the global norm themselves
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    switch.skip = True
    wrapper.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- the watchdog ----------------------------------------------------------------------------------
def test_the_allowance_follows_the_median_step_phases_and_the_first_step():
    auto = HangLimits.from_run(SimpleNamespace(hang_timeout_s=None, compile=None))
    assert (auto.first_step_s, auto.collective_s) == (900.0, 1320.0)
    assert HangLimits.from_run(
        SimpleNamespace(hang_timeout_s=None, compile="inductor")).first_step_s == 2700.0
    dog = Watchdog(auto, rank=0)
    assert dog.allowance_s() == 900.0  # before the first step
    dog._stepped = True
    dog._step_times.extend([40.0] * 10)
    assert dog.base_s() == 400.0 and dog.allowance_s() == 400.0  # 10x the median step
    dog._step_times.clear()
    dog._step_times.extend([1.0] * 10)
    assert dog.allowance_s() == 300.0  # the floor
    dog._longest["save"] = 200.0
    with dog.phase("save"):
        assert dog.allowance_s() == 300.0 + 800.0
    dog._longest["save"] = 2000.0
    with dog.phase("save"):
        assert dog.allowance_s() == auto.collective_s - 60.0  # always below the collective timeout
    fixed = Watchdog(HangLimits.from_run(SimpleNamespace(hang_timeout_s=10.0, compile=None)),
                     rank=0)
    assert fixed.allowance_s() == 30.0 and fixed.limits.collective_s == 160.0


HUNG_RANK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from neox_train.train.watchdog import HangLimits, Watchdog
    dog = Watchdog(HangLimits(fixed_s=1.0, first_step_s=5.0, collective_s=100.0), rank=3,
                   poll_s=0.1).start()
    dog.started_at_step(0)
    dog.beat(1)
    def stuck_in_a_collective():
        time.sleep(60)
    stuck_in_a_collective()
""")


def test_a_rank_without_progress_prints_its_stacks_and_exits_75(tmp_path):
    started = time.monotonic()
    env = {**os.environ, health.STATUS_DIR_ENV: str(tmp_path), health.ATTEMPT_ENV: "2"}
    proc = subprocess.run([sys.executable, "-c", HUNG_RANK.format(repo=str(REPO))], env=env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == health.HANG_EXIT_CODE, proc.stderr[-3000:]
    assert elapsed < 10
    assert "hang: rank 3" in proc.stderr and "after step 1 (allowance 1 s)" in proc.stderr
    assert "in stuck_in_a_collective" in proc.stderr  # faulthandler's dump of the main thread
    status = health.read_statuses(tmp_path, 2)[3]
    assert (status.state, status.exit_code, status.step) == (health.HUNG, health.HANG_EXIT_CODE, 1)
    stacks = health.status_path(tmp_path, 2, 3).with_suffix(".stacks.txt").read_text()
    assert "stuck_in_a_collective" in stacks


# -- the supervisor on stand-in jobs ---------------------------------------------------------------
# A job of one "rank": it reads its attempt, reports a start step and progress like neox-train's
# watchdog does, and ends as the script of that attempt says (a list indexed by attempt: (kind, step
# reached)).
FAKE_RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from neox_train import health
    plan = json.loads({plan!r})
    attempt = health.attempt()
    kind, reached = plan[min(attempt, len(plan) - 1)]
    root = health.status_dir()
    start = 0 if attempt == 0 else 2
    status = health.RankStatus(rank=0, attempt=attempt, state="training", start_step=start,
                               step=start, deadline_s=1.0)
    health.write_status(root, status)
    with open(os.path.join(os.path.dirname(root), "args.txt"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    status.step, status.first_step_at = reached, time.time()
    health.write_status(root, status)
    if kind == "done":
        status.state, status.exit_code = "done", 0
        health.write_status(root, status)
        sys.exit(0)
    if kind == "stopped":
        status.state, status.exit_code, status.detail = (
            "stopped", 2, "error: config file x.json: bad")
        health.write_status(root, status)
        sys.exit(2)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "freeze":
        time.sleep(120)
""")


def _fake_job(tmp_path: Path, plan: list[tuple[str, int]]) -> sup.Job:
    script = FAKE_RANK.format(repo=str(REPO), plan=json.dumps(plan))

    def command_for(n: int) -> list[str]:
        return [sys.executable, "-c", script] + (["--resume", "auto"] if n else [])

    return sup.Job(command_for=command_for, env_for=lambda n, extra: {**os.environ, **extra},
                   launch_dir=tmp_path, kill_pattern="unused")


def _supervise(tmp_path, plan, **kw) -> tuple[int, dict]:
    s = sup.Supervisor(_fake_job(tmp_path, plan), max_restarts=kw.pop("max_restarts", 3),
                       backoff_s=0.0, preemption_grace_s=5.0, out=kw.pop("out", sys.stderr))
    code = s.run()
    return code, json.loads((tmp_path / "attempts.json").read_text())


def test_a_killed_job_restarts_with_resume_auto_and_reports_what_it_lost(tmp_path):
    code, summary = _supervise(tmp_path, [("kill", 5), ("done", 8)])
    assert code == 0 and summary["result"] == "finished" and summary["restarts"] == 1
    first, second = summary["attempts"]
    assert (first["kind"] == "crash" and "ended without a word" in first["cause"]
            and "SIGKILL" in first["cause"])
    assert (first["step"], second["start_step"], first["steps_lost"]) == (5, 2, 3)
    assert first["recovery_s"] is not None and 0 <= first["recovery_s"] < 30
    assert (tmp_path / "args.txt").read_text().splitlines() == ["", "--resume auto"]
    assert (tmp_path / "attempt-0.log").exists() and (tmp_path / "attempt-1.log").exists()


def test_the_same_step_dying_twice_gives_up_with_a_summary(tmp_path, capsys):
    code, summary = _supervise(tmp_path, [("kill", 4), ("kill", 4)], max_restarts=5)
    assert code != 0 and summary["restarts"] == 1 and len(summary["attempts"]) == 2
    assert "without progress" in summary["result"]
    err = capsys.readouterr().err
    assert "gave up: attempts 0 and 1 both failed (crash) at step 4 without progress" in err
    assert "attempt 0: crash" in err and "attempt 1: crash" in err


def test_restarts_run_out(tmp_path):
    code, summary = _supervise(tmp_path, [("kill", 3), ("kill", 5), ("kill", 7)], max_restarts=2)
    assert (code != 0 and summary["result"] == "gave up: all 2 restart(s) used"
            and len(summary["attempts"]) == 3)


def test_a_deliberate_stop_is_never_restarted(tmp_path):
    code, summary = _supervise(tmp_path, [("stopped", 0)])
    assert (code == 2 and len(summary["attempts"]) == 1
            and summary["attempts"][0]["kind"] == "stopped")
    assert "stopped deliberately: error: config file x.json: bad" in summary["result"]


def test_a_frozen_rank_is_found_by_its_stale_heartbeat_and_killed(tmp_path, monkeypatch):
    """A rank that cannot run its own watchdog (SIGSTOP, a frozen node) stops sending heartbeats."""
    monkeypatch.setattr(sup, "STALE_MARGIN_S", 1.0)
    monkeypatch.setattr(sup, "EXIT_GRACE_S", 0.5)
    started = time.monotonic()
    code, summary = _supervise(tmp_path, [("freeze", 3), ("done", 6)])
    assert code == 0 and time.monotonic() - started < 60
    assert (summary["attempts"][0]["kind"] == "hang"
            and "sent no heartbeat" in summary["attempts"][0]["cause"])


def test_exit_statuses_are_described():
    assert "SIGKILL" in describe_exit(247) and "hang watchdog" in describe_exit(75)
    assert "SIGTERM" in describe_exit(143) and describe_exit(1) == "exit status 1"


def test_the_kill_pattern_matches_the_ranks_command_lines_but_not_its_own_text(tmp_path):
    import re

    ds = tmp_path / "run.1" / "launch" / "ds_config.json"
    pattern = sup.kill_pattern(ds)
    rank = f"python -u neox-train --config run.json --ds-config {ds} --micro-batch 4"
    assert re.search(pattern, rank)
    assert not re.search(pattern, f"sh -c pkill -KILL -f '{pattern}'")
    assert not re.search(pattern, rank.replace("run.1", "runx1"))  # the dot is literal


def test_two_different_faults_at_one_step_are_not_a_repeating_one():
    kill = Attempt(0, 0.0, kind="crash", step=6, start_step=0)
    hang = Attempt(1, 0.0, kind="hang", step=6, start_step=4)
    assert not no_progress(kill, hang)
    assert no_progress(hang, Attempt(2, 0.0, kind="hang", step=6, start_step=4))
    assert not no_progress(hang, Attempt(2, 0.0, kind="hang", step=7, start_step=4))
