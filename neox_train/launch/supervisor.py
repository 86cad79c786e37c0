"""The supervisor behind `neox-launch --max-restarts N`: run the job, and when it fails, stop all of
it and start it again from its newest complete checkpoint.

One attempt is one run of the deepspeed launcher (and through it, pdsh/mpirun/srun and every rank).
The ranks report through their status files (health.py). An attempt fails when the launcher exits
non-zero, when a rank reports that it crashed or hung (its watchdog exits it with code 75), or when
a rank's heartbeat goes stale (a stopped or frozen process whose own watchdog cannot run). Then
every process of the job is killed: the launcher's process group here (SIGKILL: every checkpoint
protocol step is crash-safe, so nothing is gained by waiting), the ranks on the other nodes with
`pkill` over pdsh (their command lines carry this launch folder's DeepSpeed JSON), or mpirun/srun's
own teardown. After a backoff the next attempt starts with `--resume auto` (the newest complete
checkpoint here, else the bucket's newest COMPLETE one, else step 0).

It gives up (non-zero exit, a summary of every attempt) when N restarts are used up, when two
attempts in a row end without getting past the step the one before reached (a deterministic fault: a
restart cannot help), or at once for a deliberate stop (bad input exits 2, a diverged run or
unpublishable checkpoints exit 1). A SIGTERM or SIGINT to the supervisor (preemption) goes to every
process of the job and never triggers a restart.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from neox_train import health
from neox_train.launch.attempts import Attempt, describe_exit, no_progress, report, signal_name
from neox_train.launch.launcher import start_launcher

POLL_S = 0.5
# after a rank reports its failure: the launcher's own exit, with its last lines, before ours
EXIT_GRACE_S = 5.0
STALE_MARGIN_S = 60.0  # a heartbeat older than the rank's allowance plus this: the rank is frozen
MAX_BACKOFF_S = 300.0
# mpirun / srun: SIGTERM first, so they take their remote ranks down with them
TERMINATE_WAIT_S = 10.0


@dataclass(frozen=True)
class Job:
    """What the supervisor runs: the command and environment of each attempt (0, 1, ...), and how to
    reach the job's processes on other nodes."""

    command_for: Callable[[int], list[str]]
    # (attempt, supervisor variables) -> environment
    env_for: Callable[[int, dict[str, str]], dict[str, str]]
    launch_dir: Path
    # an extended regular expression matching every rank's command line, not its own text
    kill_pattern: str
    hosts: tuple[str, ...] = ()  # other nodes (empty: a single-node job)
    launcher: str = "pdsh"
    ssh_port: int | None = None


class Supervisor:
    def __init__(self, job: Job, *, max_restarts: int, backoff_s: float, preemption_grace_s: float,
                 out: IO[str] | None = None):
        self.job = job
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.preemption_grace_s = preemption_grace_s
        self.out = out or sys.stderr
        self.status_root = job.launch_dir / "status"
        self.attempts: list[Attempt] = []
        self._signal: int | None = None
        self._stale = False  # this attempt's failure is a rank's stale heartbeat
        self._proc: subprocess.Popen | None = None

    def say(self, text: str) -> None:
        print(f"neox-launch: supervisor: {text}", file=self.out, flush=True)

    # -- the attempts ------------------------------------------------------------------------------
    def run(self) -> int:
        # a previous supervisor's reports are not ours
        shutil.rmtree(self.status_root, ignore_errors=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code, verdict = self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        report(self.attempts, code, verdict, launch_dir=self.job.launch_dir, say=self.say)
        return code

    def _loop(self) -> tuple[int, str]:
        number = 0
        while True:
            attempt = self._run_attempt(number)
            self.attempts.append(attempt)
            if attempt.kind == "done":
                return 0, "finished"
            if attempt.kind in ("preempted", "stopped"):
                return attempt.exit_code or 1, attempt.cause
            if number >= self.max_restarts:
                return attempt.exit_code or 1, f"gave up: all {self.max_restarts} restart(s) used"
            if len(self.attempts) >= 2 and no_progress(self.attempts[-2], attempt):
                where = f"step {attempt.step}" if attempt.step is not None else "start-up"
                return attempt.exit_code or 1, (
                    f"gave up: attempts {number - 1} and {number} both failed ({attempt.kind}) at "
                    f"{where} without progress (a fault that repeats, not a transient one: a "
                    "restart cannot help)")
            wait = min(self.backoff_s * 2 ** (number), MAX_BACKOFF_S)
            self.say(f"attempt {number} failed ({attempt.kind}: {attempt.cause}); restarting from "
                     f"the newest complete checkpoint in {wait:g} s (restart {number + 1} of at "
                     f"most {self.max_restarts})")
            if self._sleep(wait):
                return 143, "stopped by a signal during the backoff"
            number += 1

    def _env(self, number: int) -> dict[str, str]:
        lost = sum(a.steps_lost or 0 for a in self.attempts[:-1])
        values = {health.STATUS_DIR_ENV: str(self.status_root), health.ATTEMPT_ENV: str(number),
                  health.RESTARTS_ENV: str(number)}
        if self.attempts:
            values[health.STEPS_LOST_ENV] = str(lost)
            values[health.PREVIOUS_STEP_ENV] = str(self.attempts[-1].step or 0)
        return values

    def _run_attempt(self, number: int) -> Attempt:
        attempt = Attempt(number=number, started_at=time.time())
        self._stale = False
        command = self.job.command_for(number)
        env = self.job.env_for(number, self._env(number))
        log_path = self.job.launch_dir / f"attempt-{number}.log"
        self.say(f"attempt {number}: {shlex.join(command)} (output also in {log_path})")
        with open(log_path, "a", buffering=1) as log_file:
            proc = start_launcher(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
            self._proc = proc
            tees = [threading.Thread(target=_tee, args=(src, dst, log_file), daemon=True)
                    for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
            for t in tees:
                t.start()
            failure = self._watch(proc, attempt)
            if proc.poll() is None or failure:
                self._kill(proc)
            proc.wait()
            for t in tees:
                t.join(timeout=5)
            self._proc = None
        attempt.ended_at = time.time()
        # A launcher killed by a signal: the shell's convention (128 + the signal), so our own exit
        # says the same.
        attempt.exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        self._update(attempt)
        self._classify(attempt, failure)
        if self.attempts:
            before = self.attempts[-1]
            if attempt.start_step is not None and before.step is not None:
                before.steps_lost = max(0, before.step - attempt.start_step)
            if attempt.first_step_at is not None and before.ended_at is not None:
                before.recovery_s = attempt.first_step_at - before.ended_at
        return attempt

    def _update(self, attempt: Attempt) -> dict[int, health.RankStatus]:
        statuses = health.read_statuses(self.status_root, attempt.number)
        starts = [s.start_step for s in statuses.values() if s.start_step is not None]
        steps = [s.step for s in statuses.values() if s.step is not None]
        firsts = [s.first_step_at for s in statuses.values() if s.first_step_at is not None]
        attempt.start_step = min(starts) if starts else attempt.start_step
        attempt.step = max(steps) if steps else attempt.step
        attempt.first_step_at = min(firsts) if firsts else attempt.first_step_at
        return statuses

    def _watch(self, proc: subprocess.Popen, attempt: Attempt) -> str:
        """Until the launcher exits, or a rank's failure is seen ("" for a launcher that exited on
        its own)."""
        failure, seen_at = "", 0.0
        signalled_at = None
        while proc.poll() is None:
            statuses = self._update(attempt)
            if self._signal is not None:
                signalled_at = signalled_at or time.monotonic()
                if time.monotonic() - signalled_at > self.preemption_grace_s + 15:
                    return "the job outlived the preemption grace period"
            elif not failure:
                failure, attempt_stale = _rank_failure(statuses)
                if failure:
                    seen_at = time.monotonic()
                    self._stale = attempt_stale
            elif time.monotonic() - seen_at > EXIT_GRACE_S:
                return failure
            time.sleep(POLL_S)
        return failure

    def _classify(self, attempt: Attempt, failure: str) -> None:
        statuses = health.read_statuses(self.status_root, attempt.number)
        by_state: dict[str, list[health.RankStatus]] = {}
        for s in statuses.values():
            by_state.setdefault(s.state, []).append(s)
        code = attempt.exit_code
        if self._signal is not None:
            attempt.kind, attempt.cause = "preempted", (
                f"{signal_name(self._signal)} to the supervisor: passed on to the job "
                f"({describe_exit(code)})")
            if statuses and all(s.state == health.DONE for s in statuses.values()):
                # saved and stopped: the shell's code for that signal
                attempt.exit_code = 128 + self._signal
        elif code == 0 and not failure:
            attempt.kind, attempt.cause = "done", "finished"
        elif by_state.get(health.STOPPED):
            first = by_state[health.STOPPED][0]
            attempt.kind, attempt.cause = "stopped", (f"rank {first.rank} stopped deliberately: "
                                                      f"{first.detail}")
            attempt.exit_code = first.exit_code or code
        elif by_state.get(health.HUNG):
            first = min(by_state[health.HUNG], key=lambda s: s.updated_at)
            attempt.kind, attempt.cause = "hang", first.detail
        elif failure and self._stale:
            attempt.kind, attempt.cause = "hang", failure
        elif code == 143 and statuses and all(s.state == health.DONE for s in statuses.values()):
            attempt.kind, attempt.cause = ("preempted",
                                           "the ranks were sent SIGTERM (saved and stopped)")
        else:
            silent = [s for s in statuses.values() if s.state in health.ALIVE]
            # The first to fail is the cause; the others' errors follow from it (a peer gone from a
            # collective).
            crashed = sorted(by_state.get(health.FAILED, []), key=lambda s: s.updated_at)
            if silent:
                who = ", ".join(f"rank {s.rank} (pid {s.pid} on {s.host})" for s in silent)
                attempt.cause = (f"{who} ended without a word (killed by a signal: kill -9, the "
                                 f"OOM killer, a lost node); {describe_exit(code)}")
            elif crashed:
                attempt.cause = f"rank {crashed[0].rank} crashed: {crashed[0].detail}"
            else:
                attempt.cause = (f"the launcher ended with {describe_exit(code)} before any rank "
                                 "reported")
            attempt.kind = "crash"
        if attempt.exit_code in (None, 0) and attempt.kind != "done":
            attempt.exit_code = 1

    # -- stopping the job --------------------------------------------------------------------------
    def _kill(self, proc: subprocess.Popen) -> None:
        """Every process of the attempt, on every node."""
        job = self.job
        if job.launcher in ("openmpi", "slurm") and job.hosts:
            _signal_group(proc, signal.SIGTERM)  # mpirun / srun take their remote ranks down
            try:
                proc.wait(timeout=TERMINATE_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)
        if job.hosts and job.launcher == "pdsh":
            self._remote_kill()

    def _remote_kill(self) -> None:
        job = self.job
        env = dict(os.environ)
        env["PDSH_RCMD_TYPE"] = "ssh"
        if job.ssh_port is not None:
            env["PDSH_SSH_ARGS_APPEND"] = (f"{env.get('PDSH_SSH_ARGS_APPEND', '')} "
                                           f"-p {job.ssh_port}").strip()
        cmd = ["pdsh", "-S", "-f", "64", "-w", ",".join(job.hosts),
               f"pkill -KILL -f {shlex.quote(job.kill_pattern)}; true"]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.say(f"could not stop the ranks on {', '.join(job.hosts)} ({e}); the next attempt "
                     "may meet them")
            return
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            self.say(f"stopping the ranks on {', '.join(job.hosts)}: pdsh exit {done.returncode} "
                     f"({last})")

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signum
        if self._proc is not None and self._proc.poll() is None:
            # as a scheduler does: every process of the job gets it
            _signal_group(self._proc, signum)

    def _sleep(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._signal is not None:
                return True
            time.sleep(min(POLL_S, max(end - time.monotonic(), 0)))
        return self._signal is not None


def _rank_failure(statuses: dict[int, health.RankStatus]) -> tuple[str, bool]:
    """(what failed, "" when nothing did; whether it is a stale heartbeat)."""
    now = time.time()
    for s in statuses.values():
        if s.state in (health.FAILED, health.HUNG, health.STOPPED):
            return f"rank {s.rank} {s.state}: {s.detail}", False
    for s in statuses.values():
        if (s.state in health.ALIVE and s.deadline_s is not None
                and now - s.updated_at > s.deadline_s + STALE_MARGIN_S):
            return (f"rank {s.rank} (pid {s.pid} on {s.host}) sent no heartbeat for "
                    f"{now - s.updated_at:.0f} s (allowance {s.deadline_s:.0f} s): stopped or "
                    "frozen, its own watchdog could not run"), True
    return "", False


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _tee(src: IO[bytes], dst: IO[str], log_file: IO[str]) -> None:
    for raw in iter(src.readline, b""):
        line = raw.decode(errors="replace")
        try:
            dst.write(line)
            dst.flush()
            log_file.write(line)
        except (OSError, ValueError):
            pass
    src.close()


def kill_pattern(ds_config_path: Path) -> str:
    """An extended regular expression for the command lines of the job's ranks (and their node
    launchers): every one carries `--ds-config LAUNCH_DIR/ds_config.json`. The bracket keeps the
    pattern from matching its own text in the remote shell that runs pkill."""
    escaped = "".join(f"\\{c}" if c in ".[]()*+?{}|^$\\" else c for c in str(ds_config_path))
    return f"[-]-ds-config {escaped}"
