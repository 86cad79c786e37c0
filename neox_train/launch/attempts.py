"""One attempt of a supervised job, as the supervisor records and reports it: the `Attempt` record,
how an exit status reads, the rule that stops the restarts (two attempts that fail alike without
progress), and the summary at the end (its lines, and LAUNCH_DIR/attempts.json).

Its own module because it is the supervisor's bookkeeping, not its control of processes: nothing
here starts, watches or kills anything, so it reads (and is tested) without a job running.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from neox_train import health


@dataclass
class Attempt:
    number: int
    started_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    kind: str = ""  # done | crash | hang | stopped | preempted
    cause: str = ""
    start_step: int | None = None  # the step it resumed from (0: from scratch)
    step: int | None = None  # the newest step a rank reported
    first_step_at: float | None = None
    steps_lost: int | None = None  # filled in once the next attempt has loaded its checkpoint
    # from this attempt's end to the next one's first completed step
    recovery_s: float | None = None

    @property
    def wall_s(self) -> float:
        return (self.ended_at or time.time()) - self.started_at


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        return f"killed by {signal_name(-code)}"
    if code == 143:
        return "exit status 143 (SIGTERM: stopped after a preemption save)"
    if code >= 192:  # DeepSpeed's launcher exits with a rank's negative return code: -9 becomes 247
        return f"exit status {code}: a rank was killed by {signal_name(256 - code)}"
    if code > 128:
        return f"exit status {code} ({signal_name(code - 128)})"
    if code == health.HANG_EXIT_CODE:
        return f"exit status {code} (a rank's hang watchdog)"
    return f"exit status {code}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def no_progress(previous: Attempt, last: Attempt) -> bool:
    """Two failed attempts in a row that failed alike (both crashes, or both hangs) and the second
    no further than the first: the same fault at the same place. (A kill and then a hang at one step
    are two faults.)"""
    if previous.kind != last.kind:
        return False
    if previous.step is None and last.step is None:
        return True  # both died before a single rank reported a step
    return previous.step is not None and last.step is not None and last.step <= previous.step


def report(attempts: list[Attempt], code: int, verdict: str, *, launch_dir: Path,
           say: Callable[[str], None]) -> None:
    """The summary of the run: a line per attempt through `say`, and LAUNCH_DIR/attempts.json."""
    rows = []
    for a in attempts:
        lost = f", {a.steps_lost} step(s) lost" if a.steps_lost is not None else ""
        recovery = (f", training again {a.recovery_s:.1f} s later" if a.recovery_s is not None
                    else "")
        reached = a.step if a.step is not None else "-"
        rows.append(f"  attempt {a.number}: {a.kind} after {a.wall_s:.1f} s, steps "
                    f"{a.start_step}..{reached}{lost}{recovery}: {a.cause}")
    restarts = max(len(attempts) - 1, 0)
    say(f"{verdict} (exit {code}) after {restarts} restart(s):\n" + "\n".join(rows))
    summary = {"exit_code": code, "result": verdict, "restarts": restarts,
               "steps_lost": sum(a.steps_lost or 0 for a in attempts),
               "attempts": [{**asdict(a), "wall_s": a.wall_s} for a in attempts]}
    path = launch_dir / "attempts.json"
    try:
        path.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        say(f"could not write {path}: {e}")
