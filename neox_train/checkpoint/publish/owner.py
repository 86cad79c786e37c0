"""Who may publish under a prefix: run ids and the prefix's owner object.

Every training run has an id (12 hex digits) that travels with everything it writes: the local
marker and run.json of each tag, each node's part, the manifest and COMPLETE marker of each
published checkpoint. A resumed run keeps the id of the checkpoint it resumed; a fresh run draws a
new one. Every start of a run also draws a session id.

The owner object PREFIX/.neox-owner.json names the run, and the session of it, that publishes there:

- a run claims the prefix at start-up, once its checkpoint is loaded (a create-only write, or a
  replacement of exactly the generation it read);
- a run with another id finds the prefix owned and refuses to start, unless told --takeover; the
  same run id (a resume, a restart after a crash, a second launch of the same run) takes the session
  over;
- right before writing a COMPLETE marker, and before replacing any file, a publisher reads the owner
  object again and stops, for good, unless it is still the owner: after a takeover or a double
  launch only the newest session publishes, and the older one says so on every checkpoint it can no
  longer publish;
- a start that finds the prefix owned by a run that provably died on this machine (same host and
  boot, its process gone) without publishing any checkpoint claims it without --takeover: a crashed
  first attempt needs no flag.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neox_train.checkpoint.local.tags import sort_key
from neox_train.errors import StorageError
from neox_train.remote import open_backend
from neox_train.remote.base import Backend, RemoteChanged, parse_url

OWNER = ".neox-owner.json"
_CLAIM_ATTEMPTS = 5


class PrefixOwned(StorageError):
    """Another run (or a newer session of this run) owns the prefix. Permanent: retrying cannot
    help."""


@dataclass(frozen=True)
class Identity:
    run_id: str
    session: str | None = None  # None: any session of the run may publish (neox-sync --checkpoints)


def new_id() -> str:
    return os.urandom(6).hex()


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 12 and all(
        c in "0123456789abcdef" for c in value)


def read_owner(backend: Backend, folder: str = "") -> tuple[dict[str, Any] | None, int]:
    """(the owner record of the prefix, or of `folder` below it; its generation); (None, 0) when it
    has no owner yet."""
    name = f"{folder}/{OWNER}" if folder else OWNER
    got = backend.read(name)
    if got is None:
        return None, 0
    data, generation = got
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not valid_id(record.get("run_id")):
        raise StorageError(f"{backend.url}/{name} is not an owner record written by neox-train; "
                           f"remove it by hand if nothing publishes there")
    return record, generation


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
    pid, it names one process for the life of the machine (pids are reused, start times with them
    are not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _record(identity: Identity, save_dir: str | None) -> dict[str, Any]:
    return {
        "run_id": identity.run_id,
        "session": identity.session,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "save_dir": str(Path(save_dir).resolve()) if save_dir else None,
        "claimed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _died_here(record: dict[str, Any]) -> bool:
    """The owner ran on this machine in this boot and its process is gone (False when that cannot be
    told)."""
    if (record.get("host") != socket.gethostname() or not record.get("boot_id")
            or record["boot_id"] != _boot_id()):
        return False
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    return _process_start(pid) != record.get("pid_start")


def _has_published(backend: Backend) -> list[str]:
    tags = [n[: -len("/COMPLETE")] for n in backend.list("")
            if n.endswith("/COMPLETE") and n.count("/") == 1]
    return sorted(tags, key=sort_key)


def describe(record: dict[str, Any]) -> str:
    """"run ID (on HOST, save dir DIR, claimed TIME)": who owns a prefix, in words."""
    where = ", ".join(x for x in (
        f"on {record['host']}" if record.get("host") else "",
        f"save dir {record['save_dir']}" if record.get("save_dir") else "",
        f"claimed {record['claimed_at']}" if record.get("claimed_at") else "") if x)
    return f"run {record['run_id']} ({where})" if where else f"run {record['run_id']}"


def _decide(backend: Backend, record: dict[str, Any] | None, run_id: str, *, takeover: bool) -> str:
    """May `run_id` publish where `record` is the owner? Raises PrefixOwned; returns a warning (""
    when none)."""
    if record is None or record["run_id"] == run_id:
        return ""
    published = _has_published(backend)
    if takeover:
        kept = (f"; its published checkpoints ({', '.join(published[-3:])}"
                f"{', ...' if len(published) > 3 else ''}) stay as they are and this run cannot "
                "publish the same steps" if published else "")
        return (f"--takeover: {backend.url} belongs to {describe(record)}; this run takes it "
                f"over{kept}")
    if not published and _died_here(record):
        return (f"{backend.url} was claimed by {describe(record)}, which died on this machine "
                f"without publishing a checkpoint; this run claims it")
    newest = published[-1] if published else "none"
    raise PrefixOwned(
        f"{backend.url} is owned by {describe(record)}, newest published checkpoint {newest}: to "
        f"continue that run, resume it (--resume latest in its save dir, or --resume {backend.url} "
        "on another machine); to publish this run there instead, pass --takeover (what that run "
        "published stays as it is)")


def check_start(backend: Backend, run_id: str, *, takeover: bool) -> str:
    """At start-up, before anything expensive: may a run with `run_id` publish here? Raises
    PrefixOwned (one line saying how to continue the owner, or to take over); returns a warning to
    log ("" when none)."""
    return _decide(backend, read_owner(backend)[0], run_id, takeover=takeover)


def claim(backend: Backend, identity: Identity, *, takeover: bool, save_dir: str | None) -> str:
    """Make `identity` the owner (it publishes next). Decides again on what is there now, since
    another run may have claimed the prefix since check_start. Returns a warning to log ("" when
    none)."""
    data = (json.dumps(_record(identity, save_dir), indent=1, sort_keys=True) + "\n").encode()
    for _ in range(_CLAIM_ATTEMPTS):
        record, generation = read_owner(backend)
        warning = _decide(backend, record, identity.run_id, takeover=takeover)
        try:
            backend.write_bytes(OWNER, data, generation=generation)
            return warning
        except RemoteChanged:
            continue  # claimed by someone between our read and our write: decide again
    raise StorageError(f"{backend.url}/{OWNER} kept changing while this run claimed the prefix; "
                       f"another run is claiming it at the same time")


def claim_if_unowned(backend: Backend, identity: Identity, *, save_dir: str | None) -> None:
    """For a publisher that is not a training run (neox-sync --checkpoints): an unowned prefix
    becomes the run's; an owned one stays as it is (a live trainer's session is not taken from
    it)."""
    record, _ = read_owner(backend)
    if record is None:
        try:
            backend.write_bytes(OWNER, (json.dumps(_record(identity, save_dir), indent=1,
                                                   sort_keys=True)
                                        + "\n").encode(), generation=0)
        except RemoteChanged:
            pass  # claimed meanwhile: the fence decides below
    fence(backend, identity, "publish")


def fence(backend: Backend, identity: Identity, what: str) -> None:
    """Right before an irreversible write: is `identity` still the owner? PrefixOwned (permanent) if
    not."""
    record, _ = read_owner(backend)
    if record is None:
        raise PrefixOwned(f"cannot {what} in {backend.url}: its owner object {OWNER} is gone (this "
                          f"run's claim was removed); restart the run to claim the prefix again")
    if record["run_id"] != identity.run_id:
        raise PrefixOwned(f"cannot {what} in {backend.url}: the prefix belongs to "
                          f"{describe(record)}, not to this run ({identity.run_id}); the "
                          "checkpoint stays local")
    if identity.session is not None and record.get("session") != identity.session:
        raise PrefixOwned(f"cannot {what} in {backend.url}: a newer start of this run "
                          f"({describe(record)}) publishes there now (a second launch?); this "
                          "process's checkpoints stay local")


def owner_at_or_above(url: str, *, credentials: str | None = None) -> dict[str, Any] | None:
    """The owner record of the run whose prefix holds `url` (an owner object at `url` or in a folder
    above it), or None: where a plain copy must not write."""
    kind, where, prefix = parse_url(url)
    if kind == "gs":
        root, parts = (open_backend(f"gs://{where}", credentials=credentials),
                       prefix.split("/") if prefix else [])
    else:
        root, parts = open_backend("/"), Path(where).parts[1:]
    for depth in range(len(parts) + 1):  # one backend (one client) for every level, the root first
        record, _ = read_owner(root, "/".join(parts[:depth]))
        if record is not None:
            return record
    return None
