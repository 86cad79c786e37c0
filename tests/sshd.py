"""A real sshd on a loopback port, and pdsh, so a multi-node launch can run on one machine.

Host aliases (node0, node1, ...) all resolve to 127.0.0.1 through a private ssh client config; every
ssh run by the code under test (DeepSpeed's ssh check, pdsh's ssh module, neox-launch's pre-flight)
picks it up through an `ssh` wrapper put first on PATH, because ssh reads ~/.ssh/config from the
passwd home directory, not $HOME: a private config given by -F is the only way that leaves the
user's own ~/.ssh untouched.

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

from syspkgs import ToolsUnavailable, ensure

SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless run by absolute path (it re-executes itself)
START_TIMEOUT_S = 20.0
SshdUnavailable = ToolsUnavailable  # the skip reason of the fixtures below


def install_packages() -> None:
    """openssh-server, the ssh client and pdsh, from the shared system-tools kit (syspkgs.py)."""
    ensure("sshd", "ssh", "ssh-keygen", "pdsh")


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
    # Hosts with a private mount namespace (see `start(private_mounts=...)`), each served by its own
    # sshd.
    private: dict[str, subprocess.Popen] = field(default_factory=dict)
    bin_dir: Path = field(init=False)
    ssh_config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.bin_dir = self.root / "bin"
        self.ssh_config = self.root / "ssh_config"

    # -- start / stop ------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: Path, hosts: tuple[str, ...] = ("node0", "node1"),
              private_mounts: dict[str, list[tuple[Path, Path]]] | None = None) -> "SshCluster":
        """private_mounts: {host: [(source, target), ...]}: that host's sshd runs in its own mount
        namespace where each target folder is a bind mount of source, so the same path is a
        different disk on that "node" (how node-local checkpoint storage is tested on one machine).
        Needs root and unshare(1)."""
        install_packages()
        private_mounts = private_mounts or {}
        if private_mounts and (os.geteuid() != 0 or shutil.which("unshare") is None):
            raise SshdUnavailable("private mount namespaces need root and unshare(1)")
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # keys live here
        for name in ("host_key", "user_key"):
            key = root / name
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                f"neox-test-{name}", "-f", str(key)], check=True,
                               capture_output=True)
        shutil.copy(root / "user_key.pub", root / "authorized_keys")
        user = pwd.getpwuid(os.getuid()).pw_name
        ports = {host: _free_port() for host in private_mounts}
        port = _free_port()

        def sshd_config(name: str, p: int) -> Path:
            path = root / f"{name}_config"
            path.write_text("\n".join([
                f"Port {p}",
                "ListenAddress 127.0.0.1",
                f"HostKey {root / 'host_key'}",
                f"PidFile {root / name}.pid",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                # The keys sit under pytest's tmp folder, whose parents (/tmp) are world-writable:
                # StrictModes would refuse.
                "StrictModes no",
                "UsePAM no",
                "LogLevel ERROR",
                "",
            ]))
            return path

        host_pub = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"neox-test-sshd {host_pub[0]} {host_pub[1]}\n")

        def host_block(names: list[str], p: int) -> list[str]:
            return [
                f"Host {' '.join(names)}",
                "  HostName 127.0.0.1",
                f"  Port {p}",
                f"  User {user}",
                f"  IdentityFile {root / 'user_key'}",
                "  IdentitiesOnly yes",
                # One known host key for every alias: checked strictly, nothing is written to
                # ~/.ssh/known_hosts.
                "  HostKeyAlias neox-test-sshd",
                f"  UserKnownHostsFile {root / 'known_hosts'}",
                "  StrictHostKeyChecking yes",
                "  BatchMode yes",
                "  ConnectTimeout 10",
                "  LogLevel ERROR",
            ]

        shared_hosts = [h for h in hosts if h not in private_mounts]
        lines: list[str] = []
        for host in private_mounts:
            lines += host_block([host], ports[host])
        if shared_hosts:
            lines += host_block(shared_hosts, port)
        (root / "ssh_config").write_text("\n".join(lines + [""]))
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        # sshd's privilege separation directory; Debian's init script creates it, a container has
        # none running.
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        log = open(root / "sshd.log", "w")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(sshd_config("sshd", port))],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        private: dict[str, subprocess.Popen] = {}
        for host, mounts in private_mounts.items():
            binds = " && ".join(f"mount --bind {src} {dst}" for src, dst in mounts)
            private[host] = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f"{binds} && exec {SSHD} -D -e -f {sshd_config(f'sshd-{host}', ports[host])}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        cluster = cls(root=root, hosts=tuple(hosts), port=port, process=proc, private=private)
        try:
            cluster._wait_ready()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = [h for h in self.private] + [h for h in self.hosts if h not in self.private][:1]
        last = ""
        while waiting and time.monotonic() < deadline:
            for proc in [self.process, *self.private.values()]:
                if proc.poll() is not None:
                    raise SshdUnavailable(f"sshd exited with {proc.returncode}: {self._log_tail()}")
            result = self.ssh(waiting[0], "true", check=False, timeout=15)
            if result.returncode == 0:
                waiting.pop(0)
                continue
            last = result.stderr.strip()
            time.sleep(0.3)
        if waiting:
            raise SshdUnavailable(f"sshd for {waiting[0]} did not accept a login in "
                                  f"{START_TIMEOUT_S:.0f} s: {last} {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " ".join((self.root / "sshd.log").read_text().split()[-40:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop this sshd and every process its sessions started (a launch killed mid-way leaves
        ranks behind), by pid, never by name."""
        import psutil

        for daemon in [self.process, *self.private.values()]:
            try:
                children = psutil.Process(daemon.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            daemon.terminate()
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def __enter__(self) -> "SshCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use ---------------------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) with the ssh wrapper first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '')}"
        return env

    def ssh(self, host: str, command: str, *, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ssh"), host, command], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        path = Path(path)
        path.write_text("".join(f"{host} slots={slots}\n" for host in self.hosts))
        return path


@pytest.fixture(scope="session")
def ssh_cluster(tmp_path_factory):
    """One sshd for the session serving node0 and node1; skips (with the reason) only where sshd
    cannot run."""
    try:
        cluster = SshCluster.start(tmp_path_factory.mktemp("sshd"), hosts=("node0", "node1"))
    except SshdUnavailable as e:
        pytest.skip(f"sshd cannot run here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
