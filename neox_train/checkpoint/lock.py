"""One process per save dir: the lock a training run (or `neox-sync --checkpoints`) holds on SAVE_DIR.

Two processes in one save dir overwrite each other's tags, `latest` and upload journal, and the second one's claim
of the bucket prefix takes publishing away from the first. So the process that owns a save dir (global rank 0, or
each node's local rank 0 with node-local storage) locks SAVE_DIR/.neox-lock before it claims or writes anything,
and a second one is refused with one line naming the holder.

A POSIX record lock (fcntl.lockf): the kernel drops it when the process ends however it ends (kill -9 included),
so no stale lock outlives a crash; it is not inherited by forked children (data loader workers), so it never
outlives its process either; and it works on NFS, where flock may not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from neox_train.errors import CheckpointError, one_line

LOCK_FILE = ".neox-lock"
# A process of the same run that is still exiting (its rank killed by a supervisor a moment ago) releases the lock
# within moments: a start waits this long before it refuses.
WAIT_S = 5.0


class SaveDirBusy(CheckpointError):
    """Another live process holds the save dir."""


class SaveDirLock:
    def __init__(self, save_dir: Path, fd: int, *, created: bool):
        self.save_dir = save_dir
        self.created = created  # the folder did not exist before this lock
        self._fd: int | None = fd

    def release(self, *, failed_start: bool = False) -> None:
        """Drop the lock. `failed_start`: the run never got going; a folder this lock created is removed again if
        nothing else was written into it (a start that failed leaves SAVE_DIR as it was)."""
        if self._fd is None:
            return
        if failed_start and self.created:
            (self.save_dir / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.save_dir.rmdir()
            except OSError:
                pass  # something was written: keep it
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"`{' '.join(info['argv'])[:160]}`")
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are unreadable"


def lock_save_dir(save_dir: str | Path, *, why: str, wait_s: float = WAIT_S,
                  read_only_ok: bool = False) -> SaveDirLock | None:
    """Lock SAVE_DIR for this process (creating the folder). SaveDirBusy (one line ending in `why`, what to do
    instead; exit 2) if a live process holds it; CheckpointError if the folder cannot be written (read-only, no
    permission), unless `read_only_ok`: a reader such as `neox-sync --checkpoints` on a read-only copy gets None
    (nothing can be training there)."""
    save_dir = Path(save_dir)
    path = save_dir / LOCK_FILE
    created = not save_dir.exists()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if read_only_ok and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise CheckpointError(
            f"save dir {save_dir} is not writable ({one_line(e)}): checkpoints, run_config.json and the upload "
            f"journal go there (valid: a folder this user can create and write; pass --save-dir DIR)") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(f"cannot lock save dir {save_dir} ({one_line(e)})") from None
                raise SaveDirBusy(f"save dir {save_dir} is in use by another live process ({_holder(path)}); "
                                  f"{why}") from None
            time.sleep(0.2)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return SaveDirLock(save_dir, fd, created=created)
