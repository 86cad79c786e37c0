"""One process per save dir: the lock a training run (or `neox-sync --checkpoints`) holds on
SAVE_DIR.

Two processes in one save dir overwrite each other's tags, `latest` and upload journal, and the
second one's claim of the bucket prefix takes publishing away from the first. So the process that
owns a save dir (global rank 0, or each node's local rank 0 with node-local storage) locks
SAVE_DIR/.neox-lock before it claims or writes anything, and a second one is refused with one line
naming the holder. `check_free` refuses it earlier still, before data loading, without creating
anything (a start that fails leaves SAVE_DIR as it was).

A POSIX record lock (fcntl.lockf): the kernel drops it when the process ends however it ends (kill
-9 included), so no stale lock outlives a crash; it is not inherited by forked children (data loader
workers), so it never outlives its process either; and it works on NFS, where flock may not. (It is
also dropped when the process closes any descriptor of the file: nothing but this module opens it.)
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
from neox_train.log import log

LOCK_FILE = ".neox-lock"
# A process of the same run that is still exiting releases the lock within moments: a start waits
# this long before it refuses. After a restart (the supervisor just killed the previous attempt,
# whose ranks may take a while to tear down pinned buffers and a CUDA context) it waits
# RESTART_WAIT_S.
WAIT_S = 5.0
RESTART_WAIT_S = 90.0
_BUSY = (errno.EAGAIN, errno.EACCES)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class SaveDirBusy(CheckpointError):
    """Another live process holds the save dir."""


class SaveDirLock:
    def __init__(self, save_dir: Path, fd: int, *, created: bool):
        self.save_dir = save_dir
        self.created = created  # the folder did not exist before this lock
        self._fd: int | None = fd

    def release(self, *, failed_start: bool = False) -> None:
        """Drop the lock. `failed_start`: the run never got going; a folder this lock created is
        removed again when the lock file is all it holds (a start that failed leaves no folder
        behind)."""
        if self._fd is None:
            return
        if (failed_start and self.created
                and [p.name for p in self.save_dir.iterdir()] == [LOCK_FILE]):
            (self.save_dir / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.save_dir.rmdir()
            except OSError:
                pass  # something was written meanwhile: keep it
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"`{' '.join(info['argv'])[:160]}`")
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are unreadable"


def _not_writable(save_dir: Path, err: OSError) -> CheckpointError:
    return CheckpointError(
        f"save dir {save_dir} is not writable ({one_line(err)}): checkpoints, run_config.json and "
        "the upload journal go there (valid: a folder this user can create and write; pass "
        "--save-dir DIR)")


def _busy(save_dir: Path, why: str) -> SaveDirBusy:
    return SaveDirBusy(f"save dir {save_dir} is in use by another live process "
                       f"({_holder(save_dir / LOCK_FILE)}); {why}")


def _try_lock(fd: int, save_dir: Path) -> bool:
    """True when locked, False when another process holds it. A filesystem without POSIX locks
    (ENOLCK, ENOSYS: e.g. some parallel filesystems) cannot protect the save dir: one WARNING, and
    the run goes on unprotected."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in _BUSY:
            return False
        log.warning("cannot lock save dir %s (%s): a second process in it would not be refused",
                    save_dir, one_line(e))
        return True


def check_free(save_dir: str | Path, *, why: str) -> None:
    """Before anything expensive and without creating anything: SaveDirBusy when a live process
    holds SAVE_DIR, CheckpointError when SAVE_DIR exists but cannot be written. (A save dir without
    a lock file has no holder.)"""
    save_dir = Path(save_dir)
    path = save_dir / LOCK_FILE
    if not path.exists():
        if save_dir.is_dir():
            if os.statvfs(save_dir).f_flag & os.ST_RDONLY:
                raise _not_writable(save_dir,
                                    OSError(errno.EROFS, os.strerror(errno.EROFS), str(save_dir)))
            if not os.access(save_dir, os.W_OK):
                raise _not_writable(save_dir,
                                    OSError(errno.EACCES, os.strerror(errno.EACCES), str(save_dir)))
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise _not_writable(save_dir, e) from None
    try:
        if not _try_lock(fd, save_dir):
            raise _busy(save_dir, why)
    finally:
        os.close(fd)  # the probe holds nothing: the lock itself comes with lock_save_dir


def lock_save_dir(save_dir: str | Path, *, why: str, wait_s: float = WAIT_S,
                  read_only_ok: bool = False) -> SaveDirLock | None:
    """Lock SAVE_DIR for this process (creating the folder). SaveDirBusy (one line ending in `why`,
    what to do instead; exit 2) if a live process holds it after `wait_s`; CheckpointError if the
    folder cannot be written (read-only, no permission), unless `read_only_ok`: a reader such as
    `neox-sync --checkpoints` on a read-only copy gets None (nothing can be training there)."""
    save_dir = Path(save_dir)
    created = not save_dir.exists()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(save_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if read_only_ok and e.errno in _READ_ONLY:
            return None
        raise _not_writable(save_dir, e) from None
    deadline = time.monotonic() + wait_s
    while not _try_lock(fd, save_dir):
        if time.monotonic() >= deadline:
            os.close(fd)
            raise _busy(save_dir, why)
        time.sleep(0.2)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return SaveDirLock(save_dir, fd, created=created)
