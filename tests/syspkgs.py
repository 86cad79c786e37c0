"""System tools the tests need (ssh, sshd, pdsh, mpirun), installed from Debian in one place.

Every test that runs a system tool asks for it here, through the `system_tools` fixture (or `ensure`
from another fixture), so it passes alone and in any order on a fresh machine, not only after
another test happened to install the tool first. Where a tool is missing and cannot be installed
(not root, no apt-get, no network), the test skips with that reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# tool -> (how to tell it is there, the Debian package that provides it)
TOOLS: dict[str, tuple[str, str]] = {
    "ssh": ("ssh", "openssh-client"),
    "ssh-keygen": ("ssh-keygen", "openssh-client"),
    # sshd refuses to start unless run by absolute path (it re-executes itself)
    "sshd": ("/usr/sbin/sshd", "openssh-server"),
    "pdsh": ("pdsh", "pdsh"),
    "mpirun": ("mpirun", "openmpi-bin"),
    "ompi_info": ("ompi_info", "openmpi-bin"),
}


class ToolsUnavailable(RuntimeError):
    """A tool is missing and cannot be installed here; str(err) says why (the reason a test skips
    with)."""


def _present(tool: str) -> bool:
    probe = TOOLS[tool][0]
    return Path(probe).is_file() if probe.startswith("/") else shutil.which(probe) is not None


def missing(*tools: str) -> list[str]:
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown} (known: {', '.join(TOOLS)})")
    return [t for t in tools if not _present(t)]


def apt_install(packages: list[str]) -> None:
    """`apt-get install` Debian packages; ToolsUnavailable where that cannot be done."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolsUnavailable(
            f"{', '.join(packages)} not installed and this user cannot apt-get install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    for cmd in (["apt-get", "update", "-qq"], install):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.split()[-30:])
            raise ToolsUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail}")


def ensure(*tools: str) -> None:
    """Install the Debian packages of whichever `tools` are missing; ToolsUnavailable when that
    fails. One installer at a time on this machine (pytest-xdist workers ask at once; dpkg takes
    one)."""
    if not missing(*tools):
        return
    with open("/tmp/neox-test-syspkgs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        need = missing(*tools)  # another worker may have installed them meanwhile
        if need:
            apt_install(sorted({TOOLS[t][1] for t in need}))
    still = missing(*tools)
    if still:
        raise ToolsUnavailable(f"{', '.join(still)} still missing after apt-get install")


@pytest.fixture(scope="session")
def system_tools():
    """need(*tools): make sure the tools are on this machine (installing their Debian packages
    once), or skip."""

    def need(*tools: str) -> None:
        try:
            ensure(*tools)
        except ToolsUnavailable as e:
            pytest.skip(str(e))

    return need
