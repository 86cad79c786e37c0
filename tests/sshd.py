"""A real sshd on a loopback port, and pdsh, so a multi-node launch can run on one machine.

Host aliases (node0, node1, ...) all resolve to 127.0.0.1 through a private ssh client config; every ssh run
by the code under test (DeepSpeed's ssh check, pdsh's ssh module, neox-launch's pre-flight) picks it up
through an `ssh` wrapper put first on PATH, because ssh reads ~/.ssh/config from the passwd home directory,
not $HOME: a private config given by -F is the only way that leaves the user's own ~/.ssh untouched.

Use from a test module (or, to share one sshd across modules, from conftest.py):

    from sshd import ssh_cluster  # noqa: F401  (a session-scoped pytest fixture)

    def test_x(ssh_cluster):
        env = ssh_cluster.env()                     # PATH with the ssh wrapper first
        ssh_cluster.write_hostfile(path, slots=1)   # "node0 slots=1", "node1 slots=1"

or without pytest: `with SshCluster.start(folder, hosts=("node0", "node1")) as cluster: ...`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless run by absolute path (it re-executes itself)
DEBIAN_PACKAGES = ("openssh-server", "pdsh")
START_TIMEOUT_S = 20.0


class SshdUnavailable(RuntimeError):
    """sshd cannot run here; str(err) says why (the reason a test skips with)."""


def _missing_tools() -> list[str]:
    missing = []
    if not Path(SSHD).is_file():
        missing.append("openssh-server")
    if shutil.which("pdsh") is None:
        missing.append("pdsh")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        missing.append("openssh-client")
    return missing


def install_packages() -> None:
    """openssh-server and pdsh from Debian when missing (the test set-up's job: nothing else installs them).

    Raises SshdUnavailable when they are missing and cannot be installed (not root, no apt-get, no network)."""
    missing = _missing_tools()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SshdUnavailable(f"{', '.join(missing)} not installed and this user cannot apt-get install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = sorted(set(missing) | set(DEBIAN_PACKAGES))
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    for cmd in (["apt-get", "update", "-qq"], install):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.split()[-30:])
            raise SshdUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail}")
    still = _missing_tools()
    if still:
        raise SshdUnavailable(f"{', '.join(still)} still missing after apt-get install")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SshCluster:
    """An sshd serving `hosts` (aliases of 127.0.0.1) with a generated host key and user key."""

    root: Path
    hosts: tuple[str, ...]
    port: int
    process: subprocess.Popen
    bin_dir: Path = field(init=False)
    ssh_config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.bin_dir = self.root / "bin"
        self.ssh_config = self.root / "ssh_config"

    # -- start / stop -----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: Path, hosts: tuple[str, ...] = ("node0", "node1")) -> "SshCluster":
        install_packages()
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # keys live here
        for name in ("host_key", "user_key"):
            key = root / name
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"neox-test-{name}",
                                "-f", str(key)], check=True, capture_output=True)
        shutil.copy(root / "user_key.pub", root / "authorized_keys")
        port = _free_port()
        user = pwd.getpwuid(os.getuid()).pw_name
        (root / "sshd_config").write_text("\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {root / 'host_key'}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            # The keys sit under pytest's tmp folder, whose parents (/tmp) are world-writable: StrictModes would refuse.
            "StrictModes no",
            "UsePAM no",
            "LogLevel ERROR",
            "",
        ]))
        host_pub = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"neox-test-sshd {host_pub[0]} {host_pub[1]}\n")
        (root / "ssh_config").write_text("\n".join([
            f"Host {' '.join(hosts)}",
            "  HostName 127.0.0.1",
            f"  Port {port}",
            f"  User {user}",
            f"  IdentityFile {root / 'user_key'}",
            "  IdentitiesOnly yes",
            # One known host key for every alias: checked strictly, nothing is written to ~/.ssh/known_hosts.
            "  HostKeyAlias neox-test-sshd",
            f"  UserKnownHostsFile {root / 'known_hosts'}",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
            "  LogLevel ERROR",
            "",
        ]))
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        # sshd's privilege separation directory; Debian's init script creates it, a container has none running.
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        log = open(root / "sshd.log", "w")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        cluster = cls(root=root, hosts=tuple(hosts), port=port, process=proc)
        try:
            cluster._wait_ready()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SshdUnavailable(f"sshd exited with {self.process.returncode}: {self._log_tail()}")
            proc = self.ssh(self.hosts[0], "true", check=False, timeout=15)
            if proc.returncode == 0:
                return
            last = proc.stderr.strip()
            time.sleep(0.3)
        raise SshdUnavailable(f"sshd on 127.0.0.1:{self.port} did not accept a login in {START_TIMEOUT_S:.0f} s: "
                              f"{last} {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " ".join((self.root / "sshd.log").read_text().split()[-40:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop this sshd and every process its sessions started (a launch killed mid-way leaves ranks behind),
        by pid, never by name."""
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.process.terminate()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "SshCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use ----------------------------------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) with the ssh wrapper first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '')}"
        return env

    def ssh(self, host: str, command: str, *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ssh"), host, command], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        path = Path(path)
        path.write_text("".join(f"{host} slots={slots}\n" for host in self.hosts))
        return path


@pytest.fixture(scope="session")
def ssh_cluster(tmp_path_factory):
    """One sshd for the session serving node0 and node1; skips (with the reason) only where sshd cannot run."""
    try:
        cluster = SshCluster.start(tmp_path_factory.mktemp("sshd"), hosts=("node0", "node1"))
    except SshdUnavailable as e:
        pytest.skip(f"sshd cannot run here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
