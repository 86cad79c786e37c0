"""DeepSpeed hostfiles: `HOST slots=N` lines, `#` comments, and the --include/--exclude/--num_nodes
filters.

The file is parsed here, with line numbers, and every mistake is one line before anything starts;
DeepSpeed's own parser would say "bad entry" for the whole file, accept `slots=0`, and only after
its imports. The filters are then applied by DeepSpeed's own functions (`parse_inclusion_exclusion`,
`apply_num_nodes_and_gpus`), so the hosts and slots we plan for are exactly the ones its launcher
will start.
"""

from __future__ import annotations

import re
import socket
from collections import OrderedDict
from pathlib import Path

from neox_train.errors import ConfigError

# `host slots=N`, optionally followed by a comment. DeepSpeed's pattern is r'^(\S+)\s+slots=(\d+)'
# (a prefix match); anything this accepts, it accepts too.
_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+?)\s*(?:#.*)?$")
_SLOT_SPEC = re.compile(r"^\d+(,\d+)*$")
FORMAT = "'HOST slots=N' (N a positive integer; '#' starts a comment)"


class HostfileError(ConfigError):
    """A bad hostfile or host filter; str(err) is one line naming the file, line or flag and what is
    valid."""


def parse_hostfile(path: str | Path) -> "OrderedDict[str, int]":
    """host -> slots, in file order (DeepSpeed numbers ranks in this order)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HostfileError(f"hostfile {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"hostfile {path} cannot be read: {e}") from None
    pool: OrderedDict[str, int] = OrderedDict()
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise HostfileError(f"hostfile {path} line {number}: {line!r} is not {FORMAT}")
        host, slots = m.group("host"), m.group("slots")
        if not slots.isdigit() or int(slots) <= 0:
            raise HostfileError(f"hostfile {path} line {number}: {host} slots={slots}: slots must "
                                f"be a positive integer (the number of GPUs on that host)")
        if host in pool:
            raise HostfileError(f"hostfile {path} line {number}: host {host} is listed again "
                                f"(first on line {first_line[host]}): one line per host")
        pool[host] = int(slots)
        first_line[host] = number
    if not pool:
        raise HostfileError(f"hostfile {path} lists no hosts: expected lines {FORMAT}")
    return pool


def _check_filter(flag: str, spec: str, pool: "OrderedDict[str, int]", source: str) -> None:
    """Name the exact unknown host or slot in an --include/--exclude string
    (NAME[:SLOT[,SLOT...]][@...])."""
    if not spec.strip():
        raise HostfileError(f"{flag} is empty: give HOST[:SLOT,...][@HOST...] from {source}")
    hosts = ", ".join(pool)
    for part in spec.split("@"):
        name, _, slots = part.partition(":")
        if name not in pool:
            raise HostfileError(
                f"{flag} {spec!r} names host {name!r}, which is not in {source} (hosts: {hosts})")
        if ":" in part:
            if not _SLOT_SPEC.match(slots):
                raise HostfileError(
                    f"{flag} {spec!r}: {part!r} must be HOST:SLOT[,SLOT...] with integer slots")
            bad = [int(s) for s in slots.split(",") if int(s) >= pool[name]]
            if bad:
                raise HostfileError(f"{flag} {spec!r}: {name} has no slot {bad[0]} (its slots are "
                                    f"0..{pool[name] - 1})")


def select(pool: "OrderedDict[str, int]", *, include: str = "", exclude: str = "",
           num_nodes: int | None = None,
           source: str = "the hostfile") -> "OrderedDict[str, list[int]]":
    """host -> slot ids the launch will use, by DeepSpeed's own filter rules."""
    if include and exclude:
        raise HostfileError(
            "--include and --exclude are mutually exclusive (DeepSpeed accepts one of them)")
    if num_nodes is not None and (include or exclude):
        raise HostfileError("--num-nodes cannot be combined with --include/--exclude (DeepSpeed "
                            "refuses the mix): name the hosts in --include instead")
    if num_nodes is not None and not 1 <= num_nodes <= len(pool):
        raise HostfileError(f"--num-nodes {num_nodes} is out of range: {source} lists {len(pool)} "
                            f"host(s) ({', '.join(pool)})")
    if include:
        _check_filter("--include", include, pool, source)
    if exclude:
        _check_filter("--exclude", exclude, pool, source)
    # Deferred: deepspeed (~1.7 s at import) loads only when a hostfile is filtered, after the cheap
    # checks above.
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    try:
        active = parse_inclusion_exclusion(pool, include, exclude)
    except ValueError as e:  # a rule we did not foresee: still one line, in DeepSpeed's words
        raise HostfileError(f"host filter: {e}") from None
    active = apply_num_nodes_and_gpus(active, num_nodes if num_nodes is not None else -1, -1)
    if not active:
        raise HostfileError(f"--exclude {exclude!r} leaves no slots in {source}")
    return OrderedDict((host, list(slots)) for host, slots in active.items())


def write_hostfile(pool: "OrderedDict[str, int]", path: Path) -> Path:
    """A normalised copy (what DeepSpeed and mpirun read in the run folder): no comments, one host
    per line."""
    path.write_text("".join(f"{host} slots={slots}\n" for host, slots in pool.items()))
    return path


def is_this_machine(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn())


def ranks_elsewhere(hosts) -> bool:
    """A hostfile none of whose hosts is this machine (launched from a login node): local GPUs say
    nothing."""
    return bool(hosts) and not any(is_this_machine(h) for h in hosts)


def describe(active: "OrderedDict[str, list[int]]") -> str:
    return ", ".join(f"{host} ({len(slots)})" for host, slots in active.items())
