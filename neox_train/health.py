"""How a rank tells the supervisor (`neox-launch --max-restarts N`) what it is doing and how it
ended.

Each rank of a supervised job writes one small JSON file, STATUS_DIR/attempt-A/rank-R.json, replaced
atomically: its step, when it last made progress, how long it may go without a step before its
watchdog calls it hung, and, at the end, its fate. STATUS_DIR lies in the launch folder, which every
node reads already (the DeepSpeed JSON is there), so the supervisor sees the ranks of every node. A
rank without a supervisor (no NEOX_STATUS_DIR) writes nothing.

Both sides import this module and nothing else of each other: launch/ (the supervisor) and train/
(the watchdog, the loop) sit side by side, and the file format and the exit codes are the one place
they share.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# A rank whose watchdog fired exits with this code (sysexits' EX_TEMPFAIL: "try again later"), so a
# hang is told apart from a crash (1, or a signal) and from a deliberate stop.
HANG_EXIT_CODE = 75

# The supervisor passes these to every rank through .deepspeed_env (NEOX_* reaches every node).
STATUS_DIR_ENV = "NEOX_STATUS_DIR"
ATTEMPT_ENV = "NEOX_ATTEMPT"  # 0 for the first start, 1 after the first restart, ...
RESTARTS_ENV = "NEOX_RESTARTS"  # restarts so far, and the steps they lost, for rank 0's TensorBoard
STEPS_LOST_ENV = "NEOX_STEPS_LOST"
PREVIOUS_STEP_ENV = "NEOX_PREVIOUS_STEP"  # the step the previous start reached

# A rank's state: training (alive), and the terminal ones.
ALIVE = ("starting", "training")
# stopped: a deliberate stop (bad input, ...)
DONE, FAILED, HUNG, STOPPED = "done", "failed", "hung", "stopped"


def attempt() -> int:
    return int(os.environ.get(ATTEMPT_ENV, "0") or 0)


@dataclass
class RankStatus:
    rank: int
    attempt: int
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    state: str = "starting"
    # the step this attempt resumed from (None until the checkpoint is loaded)
    start_step: int | None = None
    step: int | None = None  # the newest completed optimizer step
    first_step_at: float | None = None  # wall clock of this attempt's first completed step
    # wall clock of the newest step (or the start)
    progress_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)  # wall clock of this write (a heartbeat)
    deadline_s: float | None = None  # the watchdog's current allowance without a step
    phase: str = "start"
    exit_code: int | None = None
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def status_dir() -> Path | None:
    value = os.environ.get(STATUS_DIR_ENV)
    return Path(value) if value else None


def status_path(root: Path, attempt_no: int, rank: int) -> Path:
    return root / f"attempt-{attempt_no}" / f"rank-{rank}.json"


def write_status(root: Path, status: RankStatus) -> None:
    """Replace this rank's file atomically (a reader sees the old or the new, never half). Best
    effort: a status file that cannot be written must never stop training."""
    path = status_path(root, status.attempt, status.rank)
    status.updated_at = time.time()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(status.to_json())
        os.replace(tmp, path)
    except OSError:
        pass


def read_statuses(root: Path, attempt_no: int) -> dict[int, RankStatus]:
    """Every rank file of an attempt that parses (a rank that never started has none)."""
    out: dict[int, RankStatus] = {}
    folder = root / f"attempt-{attempt_no}"
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            status = RankStatus(**data)
        except (OSError, ValueError, TypeError):
            continue
        out[status.rank] = status
    return out
