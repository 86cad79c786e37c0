"""GCS test kit: the real gcp-storage-emulator (one per session) behind a layer that enforces
generation preconditions as GCS does, a bucket per test, a direct client, and a fault-injecting HTTP
proxy for the real google-cloud-storage client to fight through.

The emulator accepts ifGenerationMatch (and the other preconditions) and ignores them, so on its own
two writers of one name both "win" and a create-only write replaces what is there. Every Emulator
therefore starts with a precondition-enforcing FaultProxy (`Emulator.layer`) in front of it, and
`Emulator.url` (what STORAGE_EMULATOR_HOST takes, what a test's own FaultProxy chains to) is that
layer; `Emulator.emulator_url` is the bare emulator. The layer lives as long as the emulator and
stops with it.

Import the fixtures into a test module (`from gcs import gcs_bucket, gcs_emulator  # noqa: F401`)
or wrap the plain functions in conftest.py.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

EMULATOR_BIN = Path(sys.executable).parent / "gcp-storage-emulator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`gcp-storage-emulator start --in-memory` on a free loopback port, behind a
    precondition-enforcing layer.

    url: what STORAGE_EMULATOR_HOST takes: the layer (or the emulator itself with
    enforce_preconditions=False).
    emulator_url: the emulator itself, past the layer (to look at what is stored without going
    through anything).
    layer: the FaultProxy(enforce_preconditions=True) in front, or None. Bounded: everything stops
    after lifetime_s.
    """

    def __init__(self, timeout_s: float = 30.0, nice: int = 0, *,
                 enforce_preconditions: bool = True, lifetime_s: float = 6 * 3600.0):
        self.port = free_port()
        self.emulator_url = f"http://127.0.0.1:{self.port}"
        self.url = self.emulator_url
        self.layer: FaultProxy | None = None
        self.proc = subprocess.Popen(
            [str(EMULATOR_BIN), "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.emulator_url + "/", timeout=1) as r:
                    if r.read() == b"OK":
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = (self.proc.stderr.read().decode(errors="replace")[-2000:]
                       if self.proc.poll() is not None else "")
                self.stop()
                raise RuntimeError(
                    f"gcp-storage-emulator did not answer on {self.url} within {timeout_s}s: {err}")
            time.sleep(0.05)
        if enforce_preconditions:
            # Session-long: no lifetime or request cap of its own (this object's timer bounds both),
            # no request log.
            self.layer = FaultProxy(self.emulator_url, enforce_preconditions=True, lifetime_s=None,
                                    max_requests=None, keep_log=False)
            self.url = self.layer.url
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and (self.layer is None or not self.layer.closed)

    def stop(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if self.layer is not None:
            self.layer.close()
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
    if _shared is None or not _shared.alive:
        if _shared is not None:
            _shared.stop()
        _shared = Emulator()
    return _shared


def stop_shared_emulator() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def direct_client(emulator_url: str):
    """A client for exactly this URL, whatever STORAGE_EMULATOR_HOST says (it may name a proxy):
    `Emulator.url` goes through the precondition layer, `Emulator.emulator_url` straight to the
    emulator."""
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
        backend.configure_retry(deadline_s=deadline_s, probe_deadline_s=probe_deadline_s,
                                initial_s=0.01, maximum_s=0.1)
    return backend


def force_resumable(monkeypatch: pytest.MonkeyPatch, backend,
                    chunk_bytes: int = 256 * 1024) -> None:
    """Send files over chunk_bytes as resumable uploads in chunks of chunk_bytes, so a 600 KiB test
    file takes the path a multi-GB checkpoint takes (the client switches at 8 MiB; its module
    constant is lowered here)."""
    import google.cloud.storage.blob as blob_module

    monkeypatch.setattr(blob_module, "_MAX_MULTIPART_SIZE", chunk_bytes)
    backend.chunk_size = chunk_bytes


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[Emulator]:
    yield shared_emulator()
    stop_shared_emulator()


@pytest.fixture
def gcs_bucket(gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; STORAGE_EMULATOR_HOST points the real client at the emulator (through its
    precondition layer) for this test."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return create_bucket(gcs_emulator.url)


@pytest.fixture(params=["gs", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    """The same contract on both implementations: a bucket prefix on the emulator (behind the
    enforcing layer), or a local folder (tmp_path/remote)."""
    from neox_train.remote import open_backend

    if request.param == "gs":
        bucket = request.getfixturevalue("gcs_bucket")
        return fast_retry(open_backend(f"gs://{bucket}/runs/r1"))
    return open_backend(str(tmp_path / "remote"))


# --------------------------------------------------------------------------------------------------
# fault proxy (and, with enforce_preconditions, the precondition layer every Emulator has in front)

ACTIONS = ("pass", "503", "403", "reset", "stall", "lost")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                "content-length", "te", "upgrade"}
_NAME_RE = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch",
                 "ifMetagenerationNotMatch")
_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")
_COMPOSE_PATH = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+)/compose$")
_COPY_PATH = re.compile(r"^/storage/v1/b/[^/]+/o/.+/(?:rewriteTo|copyTo)/b/([^/]+)/o/(.+)$")
_OBJECT_PATH = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/(.+)$")


@dataclass(frozen=True)
class _Op:
    """What one request does to one object, as the precondition layer sees it. kind: read, write (an
    upload, delete, metadata update, compose or copy), start (a resumable upload is opened), chunk
    (a resumable upload's chunk that does not finish it) or finish (the one that does, or a status
    query that may)."""

    kind: str
    bucket: str
    name: str
    conditions: dict[str, int] = field(default_factory=dict)
    upload_id: str | None = None

    @property
    def locked(self) -> bool:
        # Every write of an object is atomic with every conditional request's check of it; other
        # objects go on.
        return self.kind in ("write", "finish") or (self.kind != "chunk" and bool(self.conditions))


def _conditions(query: dict[str, list[str]]) -> dict[str, int]:
    out = {}
    for key in PRECONDITIONS:
        if key in query:
            with contextlib.suppress(ValueError, IndexError):
                out[key] = int(query[key][0])
    return out


def _upload_name(query: dict[str, list[str]], headers, body: bytes) -> str | None:
    """The object an upload names: ?name=, else the JSON metadata (the body of a resumable start,
    the first part of a multipart upload)."""
    if "name" in query:
        return query["name"][0]
    content_type = headers.get("Content-Type") or ""
    meta = body
    boundary = (re.search(r'boundary="?([^";]+)"?', content_type)
                if content_type.startswith("multipart/") else None)
    if boundary:
        parts = body.split(b"--" + boundary.group(1).encode("latin-1"))
        meta = parts[1].split(b"\r\n\r\n", 1)[-1] if len(parts) > 1 else b""
    with contextlib.suppress(ValueError):
        obj = json.loads(meta)
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            return obj["name"]
    found = _NAME_RE.search(meta)
    return json.loads(b'"' + found.group(1) + b'"') if found else None


def _finishes(content_range: str | None, body_len: int) -> bool:
    """Whether a resumable upload's PUT completes it: `bytes A-B/TOTAL` with B+1 == TOTAL,
    `bytes A-*/TOTAL` whose body reaches TOTAL, `bytes */TOTAL` (a status query, which completes an
    upload whose bytes are all there), or no Content-Range at all (the body is the whole object)."""
    content_range = (content_range or "").strip()
    if not content_range:
        return True
    if m := re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range):
        return int(m.group(2)) + 1 == int(m.group(3))
    if m := re.fullmatch(r"bytes (\d+)-\*/(\d+)", content_range):
        return int(m.group(1)) + body_len >= int(m.group(2))
    return re.fullmatch(r"bytes \*/\d+", content_range) is not None


def _refusal(conditions: dict[str, int], current: dict | None,
             method: str) -> tuple[int, str] | None:
    """(status, why) when `current` (the object resource, None: no live object) fails a
    precondition, as GCS decides it: ifGenerationMatch=0 means "must not exist"; a *Match on a
    missing object fails; a failed *NotMatch is 304 on a read, 412 on a write. A read of a missing
    object is left to the emulator's 404."""
    if current is None and method == "GET":
        return None
    gen = int(current["generation"]) if current is not None else None
    meta = int(current.get("metageneration") or 1) if current is not None else None
    for key, want in conditions.items():
        if key == "ifGenerationMatch":
            ok = gen is None if want == 0 else gen == want
        elif key == "ifGenerationNotMatch":
            ok = gen is not None and gen != want
        elif key == "ifMetagenerationMatch":
            ok = meta == want
        else:
            ok = meta is not None and meta != want
        if not ok:
            state = "absent" if gen is None else f"at generation {gen}, metageneration {meta}"
            return ((304 if key.endswith("NotMatch") and method == "GET" else 412),
                    f"{key}={want} but it is {state}")
    return None


class FaultProxy:
    """A threaded loopback HTTP proxy between the client and the emulator that misbehaves on a
    schedule.

    rules: {regex: [action, ...]}. The i-th request whose "METHOD /path?query" matches a regex gets
    that rule's i-th action (the first matching rule counts); later requests, and requests no rule
    matches, pass. Actions:
      pass    forwarded untouched
      503     answered 503 without forwarding (retryable)
      403     answered 403 without forwarding (permission denied)
      reset   the connection is reset right after the request headers (mid-request, body unread)
      stall   half the body is read, then a pause of stall_s, then a reset (a stuck upload)
      lost    forwarded (the write lands), then the connection is reset: the response is lost.
              Not for resumable chunk PUTs: the client retries by resending the same chunk, which
              the emulator refuses with 400 (it insists on the next offset).
    enforce_preconditions: the emulator ignores ifGenerationMatch, ifGenerationNotMatch,
      ifMetagenerationMatch and ifMetagenerationNotMatch; with this on, the proxy enforces them on
      object reads, uploads, deletes, metadata updates, composes and copies, as GCS does (see
      _refusal), answering 412 (304 for a failed *NotMatch read) itself. A resumable upload is
      checked when it is opened and again, against the preconditions it was opened with, by the PUT
      that finishes it. Check and forward happen under a lock per object (every write of an object
      takes it, conditional or not), so a conditional write never interleaves with another write of
      its object, while writes of different objects go on in parallel. Not enforced: batch requests
      and the XML API. `created` lists every object generation created through the proxy, (bucket,
      name, generation), in order; `latency` (a test may set it) is a function (method, op) ->
      seconds to wait before an object request goes on (a slow write, as a busy GCS has them). Every
      Emulator has one of these in front (Emulator.layer); a FaultProxy a test starts on
      `Emulator.url` is a second one, in front of that.
    inject_list: extra items appended to every object listing (names the emulator itself refuses to
    store).
    Bounded: it stops itself after lifetime_s or max_requests (None: no such bound). keep_log=False:
    no `log`. Location headers that name the upstream (a resumable upload's session URL) are pointed
    back at the Host the client used, so every chunk comes back through the proxy.
    cap_bytes_per_s: every connection moves at most this many bytes per second in each direction
    (the request body in, the response out), as one TCP stream from a VM to GCS does; connections
    are not capped together, so N parallel streams get N times the bandwidth. None: no cap.
    """

    def __init__(self, upstream: str, *, rules: dict[str, Sequence[str]] | None = None,
                 stall_s: float = 0.3, enforce_preconditions: bool = False,
                 inject_list: Sequence[dict] = (), lifetime_s: float | None = 60.0,
                 max_requests: int | None = 2000, keep_log: bool = True,
                 cap_bytes_per_s: float | None = None):
        rules = rules or {}
        bad = [a for actions in rules.values() for a in actions if a not in ACTIONS]
        if bad:
            raise ValueError(f"unknown fault actions {bad} (valid: {', '.join(ACTIONS)})")
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rules = [
            (re.compile(pattern), list(actions), [0]) for pattern, actions in rules.items()]
        self.stall_s = stall_s
        self.enforce_preconditions = enforce_preconditions
        self.inject_list = list(inject_list)
        self.max_requests = max_requests
        self.keep_log = keep_log
        if cap_bytes_per_s is not None and cap_bytes_per_s <= 0:
            raise ValueError(f"cap_bytes_per_s={cap_bytes_per_s}: a positive number or None")
        self.cap_bytes_per_s = cap_bytes_per_s
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, target, action)
        # (bucket, name, generation) of every object written through
        self.created: list[tuple[str, str, int]] = []
        # the proxy's own failures (each request they hit was answered 400)
        self.errors: list[str] = []
        self.latency: Callable[[str, _Op], float] | None = None
        self._requests = 0
        self._lock = threading.Lock()
        self._object_locks: dict[tuple[str, str], threading.Lock] = {}
        # open resumable uploads by upload id: what they write, on what conditions
        self._uploads: dict[str, _Op] = {}
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ProxyHandler,
                                                       bind_and_activate=True)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._closed = False
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = None
        if lifetime_s is not None:
            self._timer = threading.Timer(lifetime_s, self.close)
            self._timer.daemon = True
            self._timer.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._timer is not None:
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
            if self.keep_log:
                self.log.append((method, target, action))
            self._requests += 1
            if self.max_requests is not None and self._requests >= self.max_requests:
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

    # -- preconditions

    def classify(self, method: str, target: str, headers, body: bytes) -> _Op | None:
        """The object request `method target` acts on, with its preconditions; None: not an object
        request."""
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        conditions = _conditions(query)
        if upload := _UPLOAD_PATH.match(parts.path):
            # a resumable upload's chunk (PUT, or POST where a client posts them)
            if "upload_id" in query:
                with self._lock:
                    started = self._uploads.get(query["upload_id"][0])
                if started is None:
                    # not opened through here (or finished already): the emulator decides
                    return None
                kind = "finish" if _finishes(headers.get("Content-Range"), len(body)) else "chunk"
                return _Op(kind, started.bucket, started.name,
                           started.conditions if kind == "finish" else {}, started.upload_id)
            if method != "POST":
                return None
            name = _upload_name(query, headers, body)
            if name is None:
                return None
            resumable = query.get("uploadType", [""])[0] == "resumable"
            return _Op("start" if resumable else "write", upload.group(1), name, conditions)
        for pattern in (_COMPOSE_PATH, _COPY_PATH):
            if (m := pattern.match(parts.path)) and method == "POST":
                return _Op("write", m.group(1), unquote(m.group(2)), conditions)
        if m := _OBJECT_PATH.match(parts.path):
            if "/" in m.group(2) and re.search(r"/(compose|rewriteTo|copyTo|restore|acl)(/|$)",
                                               m.group(2)):
                return None
            if method == "GET":
                return _Op("read", m.group(1), unquote(m.group(2)), conditions)
            if method in ("DELETE", "PATCH", "PUT"):
                return _Op("write", m.group(1), unquote(m.group(2)), conditions)
        return None

    def object_lock(self, bucket: str, name: str) -> threading.Lock:
        with self._lock:
            return self._object_locks.setdefault((bucket, name), threading.Lock())

    def refusal(self, op: _Op, method: str) -> tuple[int, str] | None:
        """(status, why) if op's preconditions do not hold for the object as the upstream has it
        now."""
        status, reason, _, meta = self.upstream_request(
            "GET", f"/storage/v1/b/{op.bucket}/o/{quote(op.name, safe='')}")
        if status not in (200, 404):
            return 503, (f"the precondition check could not read {op.bucket}/{op.name}: "
                         f"{status} {reason}")
        return _refusal(op.conditions, json.loads(meta) if status == 200 else None, method)

    def precondition_failed(self, method: str, target: str, body: bytes) -> bool:
        """True when the request's preconditions do not hold now (as refusal() decides; no lock is
        taken)."""
        op = self.classify(method, target, {}, body) if self.enforce_preconditions else None
        return op is not None and bool(op.conditions) and self.refusal(op, method) is not None

    def forwarded(self, op: _Op, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Bookkeeping after the upstream answered op: open resumable uploads, created
        generations."""
        if op.kind == "start" and status == 200:
            location = next((v for k, v in headers if k.lower() == "location"), "")
            upload_id = parse_qs(urlsplit(location).query).get("upload_id", [None])[0]
            if upload_id is not None:
                with self._lock:
                    self._uploads[upload_id] = _Op("start", op.bucket, op.name, op.conditions,
                                                   upload_id)
            return
        if op.kind not in ("write", "finish") or status not in (200, 201):
            return
        if op.kind == "finish":
            with self._lock:
                self._uploads.pop(op.upload_id, None)  # kept after a 412, so a retry is refused too
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            obj = json.loads(body)
            if obj.get("kind") == "storage#object" and "generation" in obj:
                with self._lock:
                    self.created.append((obj["bucket"], obj["name"], int(obj["generation"])))

    def point_back(self, headers: list[tuple[str, str]], host: str | None) -> list[tuple[str, str]]:
        """A Location naming the upstream (host:port) names the proxy instead (the Host the client
        used)."""
        upstream = f"{self.upstream[0]}:{self.upstream[1]}"
        out = []
        for key, value in headers:
            if key.lower() == "location" and host:
                loc = urlsplit(value)
                if loc.netloc == upstream and host != upstream:
                    value = loc._replace(netloc=host).geturl()
            out.append((key, value))
        return out

    def rewrite_listing(self, method: str, target: str, status: int, body: bytes) -> bytes:
        if not (self.inject_list and method == "GET" and status == 200
                and re.match(r"^/storage/v1/b/[^/]+/o$", urlsplit(target).path)):
            return body
        listing = json.loads(body)
        listing["items"] = list(listing.get("items") or []) + self.inject_list
        return json.dumps(listing).encode()


_PACE_CHUNK = 64 * 1024  # bytes moved between two looks at the clock of a capped connection


class _Pace:
    """One connection's clock under FaultProxy.cap_bytes_per_s: after each chunk, sleep until the
    bytes moved so far took at least bytes / cap seconds (both directions share it: a request is
    read before its response is written)."""

    def __init__(self, cap_bytes_per_s: float | None):
        self.cap = cap_bytes_per_s
        self.started = time.monotonic()
        self.moved = 0

    def account(self, n: int) -> None:
        if self.cap is None:
            return
        self.moved += n
        ahead = self.moved / self.cap - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)


class _ProxyHandler(socketserver.StreamRequestHandler):
    def _read_body(self, length: int) -> bytes:
        if self.pace.cap is None:
            return self.rfile.read(length)
        parts, left = [], length
        while left > 0:
            part = self.rfile.read(min(_PACE_CHUNK, left))
            if not part:
                break
            parts.append(part)
            left -= len(part)
            self.pace.account(len(part))
        return b"".join(parts)

    def _write(self, data: bytes) -> None:
        if self.pace.cap is None:
            self.wfile.write(data)
            return
        for start in range(0, len(data), _PACE_CHUNK):
            self.wfile.write(data[start:start + _PACE_CHUNK])
            self.wfile.flush()
            self.pace.account(min(_PACE_CHUNK, len(data) - start))

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, as a dropped connection or a crashed load balancer does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _respond(self, status: int, reason: str, headers: list[tuple[str, str]],
                 body: bytes) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_HEADERS]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        self._write("\r\n".join(lines).encode("latin-1") + body)
        self.wfile.flush()

    def _error(self, status: int, reason: str, message: str | None = None) -> None:
        if status == 304:
            self._respond(status, reason, [], b"")
            return
        body = json.dumps({"error": {"code": status,
                                     "message": message or f"injected by FaultProxy: {reason}"}})
        self._respond(status, reason, [("Content-Type", "application/json")], body.encode())

    def handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        self.pace = _Pace(proxy.cap_bytes_per_s)
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
            body = self._read_body(length) if length else b""
            if action == "503":
                self._error(503, "Service Unavailable")
                return
            if action == "403":
                self._error(403, "Forbidden")
                return
            fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
            op = (proxy.classify(method, target, headers, body) if proxy.enforce_preconditions
                  else None)
            latency = proxy.latency
            if op is not None and latency is not None:
                time.sleep(latency(method, op))
            with (proxy.object_lock(op.bucket, op.name) if op is not None and op.locked
                  else contextlib.nullcontext()):
                refused = proxy.refusal(op, method) if op is not None and op.conditions else None
                if refused is not None:
                    status, why = refused
                    with proxy._lock:
                        proxy.counts[str(status)] += 1
                    reason = {304: "Not Modified", 412: "Precondition Failed"}.get(
                        status, "Service Unavailable")
                    self._error(status, reason, f"{reason} (enforced by the test proxy): "
                                                f"{op.bucket}/{op.name}: {why}")
                    return
                status, reason, resp_headers, resp_body = proxy.upstream_request(
                    method, target, fwd, body)
                if op is not None:
                    proxy.forwarded(op, status, resp_headers, resp_body)
            if action == "lost":
                self._reset()
                return
            resp_headers = proxy.point_back(resp_headers, headers.get("Host"))
            self._respond(status, reason, resp_headers,
                          proxy.rewrite_listing(method, target, status, resp_body))
        except (ConnectionError, OSError):
            pass  # the client went away: nothing to answer
        except Exception as e:  # noqa: BLE001 - a bug of the proxy: fail the request at once (400: no retries)
            with proxy._lock:
                proxy.errors.append(f"{type(e).__name__}: {e}")
            with contextlib.suppress(OSError):
                self._error(400, "Bad Request",
                            f"the test proxy failed on this request: {type(e).__name__}: {e}")


# The emulator accepts ifGenerationMatch and ignores it. GCS answers 412 to a conditional write
# whose object is not at the generation named; the emulator's own layer (Emulator.layer) plays that
# part for every test. This fixture puts a second enforcing FaultProxy in front, one of the test's
# own, whose counts and log say which requests were refused (it answers 412 itself, so the real
# client raises its real PreconditionFailed and the backend's 412 branches run end to end).
@pytest.fixture(params=["gs", "file"])
def strict_backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(backend, proxy or None): a bucket prefix behind the precondition-enforcing proxy, or a local
    folder."""
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
