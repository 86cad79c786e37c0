"""Tracker test kit: a real `mlflow server` on loopback with its own SQLite store (one per session,
each test in an experiment of its own), read back through MlflowClient; W&B offline run files read
back with the W&B SDK.

Import the fixture into a test module (`from trackers import mlflow_server  # noqa: F401`).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcs import free_port

MLFLOW_BIN = Path(sys.executable).parent / "mlflow"


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, root: Path, *, timeout_s: float = 60.0) -> "MlflowServer":
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = root / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--default-artifact-root", str(root / "artifacts")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                # no job runner: 2 processes, ready in ~4 s instead of 10 and ~6 s
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        server = cls(f"http://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {process.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return server
            except OSError:
                time.sleep(0.25)
        server.stop()
        raise RuntimeError(
            f"mlflow server not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def runs(self, experiment: str) -> list:
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every point of `key`, in the order logged."""
        points = self.client().get_metric_history(run_id, key)
        return [(m.step, m.value) for m in sorted(points, key=lambda m: (m.timestamp, m.step))]


_shared: MlflowServer | None = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One server per test process: every module that imports this fixture gets its own copy of
    it from pytest, so the server itself is shared here."""
    global _shared
    if _shared is None or _shared.process.poll() is not None:
        _shared = MlflowServer.start(tmp_path_factory.mktemp("mlflow"))
    yield _shared
    _shared.stop()


def experiment_name() -> str:
    """An experiment of a test's own (the server is shared)."""
    return f"test-{uuid.uuid4().hex[:10]}"


def _wandb_records(path: Path):
    """The records of a .wandb file: LevelDB-log framing (a 7-byte file header, 32 KiB blocks of
    chunks with crc32/length/type), ending quietly at a torn tail. W&B 0.30 moved its reader into
    wandb-core (Go); the framing is this simple, the records are the SDK's own protobuf."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), path
    block, head = 32768, 7
    pos, buf = 7, b""
    while pos + head <= len(data):
        left = block - pos % block
        if left < head:  # a block's trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + head:pos + head + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += head + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            buf = chunk
        elif kind == 3:  # MIDDLE
            buf += chunk
        elif kind == 4:  # LAST
            yield buf + chunk
            buf = b""


@dataclass
class WandbFile:
    config: dict
    rows: list[dict]  # each history row: _step and the values logged at it
    complete: bool  # the run was finished (an exit record)


def wandb_runs(wandb_dir: Path, run_id: str) -> list[WandbFile]:
    """Each offline run file of `run_id` under `wandb_dir` (one per process that logged to it),
    oldest first, read with the SDK's protobuf records."""
    from wandb.proto import wandb_internal_pb2

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    out = []
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        config, rows, complete = {}, [], False
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                updates = record.run.config.update if kind == "run" else record.config.update
                config.update({key(i): json.loads(i.value_json) for i in updates})
            elif kind == "history":
                rows.append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "exit":
                complete = True
        config.pop("_wandb", None)
        out.append(WandbFile(config, rows, complete))
    return out
