"""GCS test kit: the real gcp-storage-emulator (one per session), a bucket per test, a direct client that
bypasses everything, and a fault-injecting HTTP proxy for the real google-cloud-storage client to fight through.

Import the fixtures into a test module (`from gcs import gcs_bucket, gcs_emulator  # noqa: F401`) or wrap the
plain functions in conftest.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

EMULATOR_BIN = Path(sys.executable).parent / "gcp-storage-emulator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`gcp-storage-emulator start --in-memory` on a free loopback port; `url` is what STORAGE_EMULATOR_HOST takes."""

    def __init__(self, timeout_s: float = 30.0, nice: int = 0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(EMULATOR_BIN), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory", "-q"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as r:
                    if r.read() == b"OK":
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                self.stop()
                raise RuntimeError(f"gcp-storage-emulator did not answer on {self.url} within {timeout_s}s: {err}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()


_shared: Emulator | None = None


def shared_emulator() -> Emulator:
    """One emulator for the whole session (started on first use), whichever module asks first."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = Emulator()
    return _shared


def stop_shared_emulator() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def direct_client(emulator_url: str):
    """A client that talks to the emulator itself, whatever STORAGE_EMULATOR_HOST says (it may name a proxy)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": emulator_url})


def create_bucket(emulator_url: str) -> str:
    name = f"neox-test-{uuid.uuid4().hex[:12]}"
    direct_client(emulator_url).create_bucket(name)
    return name


def fast_retry(backend, deadline_s: float = 30.0, probe_deadline_s: float = 2.0):
    """Millisecond backoff for tests (the policy and predicate stay the library's)."""
    if hasattr(backend, "configure_retry"):
        backend.configure_retry(deadline_s=deadline_s, probe_deadline_s=probe_deadline_s, initial_s=0.01, maximum_s=0.1)
    return backend


def force_resumable(monkeypatch: pytest.MonkeyPatch, backend, chunk_bytes: int = 256 * 1024) -> None:
    """Send files over chunk_bytes as resumable uploads in chunks of chunk_bytes, so a 600 KiB test file takes
    the path a multi-GB checkpoint takes (the client switches at 8 MiB; its module constant is lowered here)."""
    import google.cloud.storage.blob as blob_module

    monkeypatch.setattr(blob_module, "_MAX_MULTIPART_SIZE", chunk_bytes)
    backend.chunk_size = chunk_bytes


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[Emulator]:
    yield shared_emulator()
    stop_shared_emulator()


@pytest.fixture
def gcs_bucket(gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; STORAGE_EMULATOR_HOST points the real client at the emulator for this test."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return create_bucket(gcs_emulator.url)


# ----------------------------------------------------------------------------------------------------------------
# fault proxy

ACTIONS = ("pass", "503", "403", "reset", "stall", "lost")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "te", "upgrade"}
_NAME_RE = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class FaultProxy:
    """A threaded loopback HTTP proxy between the client and the emulator that misbehaves on a schedule.

    rules: {regex: [action, ...]}. The i-th request whose "METHOD /path?query" matches a regex gets that rule's
    i-th action (the first matching rule counts); later requests, and requests no rule matches, pass. Actions:
      pass    forwarded untouched
      503     answered 503 without forwarding (retryable)
      403     answered 403 without forwarding (permission denied)
      reset   the connection is reset right after the request headers (mid-request, body unread)
      stall   half the body is read, then a pause of stall_s, then a reset (a stuck upload)
      lost    forwarded (the write lands), then the connection is reset: the response is lost.
              Not for resumable chunk PUTs: the client retries by resending the same chunk, which the emulator
              refuses with 400 (it insists on the next offset).
    enforce_preconditions: the emulator ignores ifGenerationMatch; with this on, the proxy is the small fake that
      enforces it, as GCS does: a request with ifGenerationMatch=G whose object is not at generation G (G=0: exists)
      is answered 412 (checked against the emulator; check and forward happen under one lock, so two conditional
      writes through the proxy never interleave).
    inject_list: extra items appended to every object listing (names the emulator itself refuses to store).
    Bounded: it stops itself after lifetime_s or max_requests.
    """

    def __init__(self, upstream: str, *, rules: dict[str, Sequence[str]] | None = None, stall_s: float = 0.3,
                 enforce_preconditions: bool = False, inject_list: Sequence[dict] = (), lifetime_s: float = 60.0,
                 max_requests: int = 2000):
        rules = rules or {}
        bad = [a for actions in rules.values() for a in actions if a not in ACTIONS]
        if bad:
            raise ValueError(f"unknown fault actions {bad} (valid: {', '.join(ACTIONS)})")
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rules = [(re.compile(pattern), list(actions), [0]) for pattern, actions in rules.items()]
        self.stall_s = stall_s
        self.enforce_preconditions = enforce_preconditions
        self.inject_list = list(inject_list)
        self.max_requests = max_requests
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, target, action)
        self._lock = threading.Lock()
        self._conditional = threading.Lock()  # one conditional request at a time: check + forward are atomic
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ProxyHandler, bind_and_activate=True)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime_s, self.close)
        self._timer.daemon = True
        self._timer.start()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _action(self, method: str, target: str) -> str:
        with self._lock:
            action = "pass"
            for pattern, actions, seen in self.rules:
                if pattern.search(f"{method} {target}"):
                    if seen[0] < len(actions):
                        action = actions[seen[0]]
                    seen[0] += 1
                    break
            self.counts[action] += 1
            self.log.append((method, target, action))
            if len(self.log) >= self.max_requests:
                threading.Thread(target=self.close, daemon=True).start()
            return action

    def upstream_request(self, method: str, target: str, headers: dict[str, str] | None = None,
                         body: bytes = b"") -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(method, target, body=body or None, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def precondition_failed(self, method: str, target: str, body: bytes) -> bool:
        """True when the request carries ifGenerationMatch=G and the object is not at generation G (G=0: it must
        not exist), checked against the emulator as GCS checks it. Uploads (multipart and the start of a
        resumable one), downloads and deletes."""
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        if not self.enforce_preconditions or "ifGenerationMatch" not in query:
            return False
        want = int(query["ifGenerationMatch"][0])
        upload = re.match(r"^/upload/storage/v1/b/([^/]+)/o$", parts.path)
        named = re.match(r"^/(?:download/)?storage/v1/b/([^/]+)/o/(.+)$", parts.path)
        if upload and method == "POST":
            bucket, name = upload.group(1), query.get("name", [None])[0]
            if name is None:
                found = _NAME_RE.search(body)
                if not found:
                    return False
                name = json.loads(b'"' + found.group(1) + b'"')
        elif named and method in ("GET", "DELETE"):
            bucket, name = named.group(1), unquote(named.group(2))
        else:
            return False
        status, _, _, meta = self.upstream_request("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}")
        current = int(json.loads(meta).get("generation") or 0) if status == 200 else 0
        exists = status == 200
        return exists if want == 0 else current != want

    def rewrite_listing(self, method: str, target: str, status: int, body: bytes) -> bytes:
        if not (self.inject_list and method == "GET" and status == 200
                and re.match(r"^/storage/v1/b/[^/]+/o$", urlsplit(target).path)):
            return body
        listing = json.loads(body)
        listing["items"] = list(listing.get("items") or []) + self.inject_list
        return json.dumps(listing).encode()


class _ProxyHandler(socketserver.StreamRequestHandler):
    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, as a dropped connection or a crashed load balancer does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _respond(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_HEADERS]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        self.wfile.write("\r\n".join(lines).encode("latin-1") + body)
        self.wfile.flush()

    def _error(self, status: int, reason: str) -> None:
        body = json.dumps({"error": {"code": status, "message": f"injected by FaultProxy: {reason}"}}).encode()
        self._respond(status, reason, [("Content-Type", "application/json")], body)

    def handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        try:
            line = self.rfile.readline(65537).decode("latin-1")
            if not line.strip():
                return
            method, target, _version = line.split()
            headers = http.client.parse_headers(self.rfile)
            length = int(headers.get("Content-Length") or 0)
            if headers.get("Transfer-Encoding"):
                self._error(501, "chunked request bodies are not supported by the test proxy")
                return
            action = proxy._action(method, target)
            if action == "reset":
                self._reset()
                return
            if action == "stall":
                self.rfile.read(length // 2)
                time.sleep(proxy.stall_s)
                self._reset()
                return
            body = self.rfile.read(length) if length else b""
            if action == "503":
                self._error(503, "Service Unavailable")
                return
            if action == "403":
                self._error(403, "Forbidden")
                return
            fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
            conditional = proxy.enforce_preconditions and "ifGenerationMatch=" in target
            with proxy._conditional if conditional else contextlib.nullcontext():
                if conditional and proxy.precondition_failed(method, target, body):
                    with proxy._lock:
                        proxy.counts["412"] += 1
                    self._error(412, "Precondition Failed")
                    return
                status, reason, resp_headers, resp_body = proxy.upstream_request(method, target, fwd, body)
            if action == "lost":
                self._reset()
                return
            self._respond(status, reason, resp_headers, proxy.rewrite_listing(method, target, status, resp_body))
        except (ConnectionError, OSError):
            pass  # the client went away: nothing to answer


# The emulator accepts ifGenerationMatch and ignores it. GCS answers 412 to a conditional write whose object is not at
# the generation named; the FaultProxy plays that part (it checks the emulator and answers 412 itself), so the real
# client raises its real PreconditionFailed and the backend's 412 branches run end to end.
@pytest.fixture(params=["gs", "file"])
def strict_backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(backend, proxy or None): a bucket prefix behind the precondition-enforcing proxy, or a local folder."""
    from neox_train.remote import open_backend

    if request.param == "file":
        yield open_backend(str(tmp_path / "remote")), None
        return
    bucket = request.getfixturevalue("gcs_bucket")
    with FaultProxy(os.environ["STORAGE_EMULATOR_HOST"], enforce_preconditions=True) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{bucket}/pre"))
        force_resumable(monkeypatch, backend)  # a 600 KiB file goes resumable (3 chunks)
        yield backend, proxy
