"""The session's emulator enforces generation preconditions as GCS does (tests/gcs.py:
Emulator.layer), through the real google-cloud-storage client: create-only writes, stale
generations, resumable uploads checked when they finish, racing writers, and two
`neox-sync --checkpoints` at once, which must leave every COMPLETE and manifest written once.

The gcp-storage-emulator itself ignores ifGenerationMatch: every test here fails if the layer is
taken away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from google.api_core.exceptions import NotModified, PreconditionFailed
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from test_sync import save_checkpoint

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.publish.protocol import COMPLETE, MANIFEST
from neox_train.errors import StorageError
from neox_train.remote import open_backend
from neox_train.remote.base import RemoteChanged, RemoteFile
from neox_train.remote.files import crc32c_of_file
from neox_train.remote.sliced import download_sliced

from gcs import (  # noqa: F401
    Emulator,
    FaultProxy,
    direct_client,
    fast_retry,
    force_resumable,
    gcs_bucket,
    gcs_emulator,
    shared_emulator,
)

BIG = 600 * 1024  # with force_resumable: a resumable upload in 3 chunks of 256 KiB


def env_client() -> storage.Client:
    """A plain client that finds the server the way every component does: through
    STORAGE_EMULATOR_HOST."""
    return storage.Client(project="test", credentials=AnonymousCredentials())


# --------------------------------------------------------------------------------------------------
# the layer is what every gcs_bucket test talks to


def test_every_gcs_bucket_test_talks_to_an_enforcing_server(gcs_bucket: str,
                                                            gcs_emulator: Emulator) -> None:
    assert shared_emulator() is gcs_emulator
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator.url != gcs_emulator.emulator_url
    blob = env_client().bucket(gcs_bucket).blob("x")
    blob.upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        env_client().bucket(gcs_bucket).blob("x").upload_from_string(
            b"second", if_generation_match=0)
    assert env_client().bucket(gcs_bucket).blob("x").download_as_bytes() == b"first"
    # A test's own FaultProxy on Emulator.url sits in front of the layer: FaultProxy -> layer ->
    # emulator.
    with FaultProxy(gcs_emulator.url) as proxy:
        client = direct_client(proxy.url)
        with pytest.raises(PreconditionFailed):
            client.bucket(gcs_bucket).blob("x").upload_from_string(b"third", if_generation_match=0)
        # A resumable session opened through the proxy names the proxy, so its chunks come back
        # through it.
        session = client.bucket(gcs_bucket).blob("y").create_resumable_upload_session(
            size=3, if_generation_match=0)
        assert urlsplit(session).netloc == urlsplit(proxy.url).netloc
        assert requests.put(session, data=b"abc",
                            headers={"Content-Range": "bytes 0-2/3"}).status_code == 200
        assert (("PUT", urlsplit(session)._replace(scheme="", netloc="").geturl(), "pass")
                in proxy.log)
    assert (proxy.counts["pass"] >= 3
            and env_client().bucket(gcs_bucket).blob("y").download_as_bytes() == b"abc")


def test_an_emulator_stops_with_its_layer() -> None:
    emulator = Emulator()
    try:
        layer = emulator.layer
        assert layer is not None and emulator.url == layer.url and emulator.alive
        # session-long: no request cap, no log to grow
        assert layer.max_requests is None and not layer.keep_log
        direct_client(emulator.url).create_bucket("neox-lifetime")
    finally:
        emulator.stop()
    assert layer.closed and emulator.proc.poll() is not None and not emulator.alive
    with pytest.raises(requests.ConnectionError):
        requests.get(emulator.url + "/", timeout=2)


# --------------------------------------------------------------------------------------------------
# single writers


@pytest.mark.parametrize("size", [100, BIG], ids=["multipart", "resumable"])
def test_a_create_only_write_of_an_existing_object_is_refused(
        gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    backend = fast_retry(open_backend(f"gs://{gcs_bucket}/p"))
    force_resumable(monkeypatch, backend)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.write_bytes(os.urandom(size))
    theirs.write_bytes(os.urandom(size))
    first = backend.upload_file(mine, "obj", crc32c=crc32c_of_file(mine), generation=0)
    with pytest.raises(RemoteChanged, match="already exists with different content"):
        backend.upload_file(theirs, "obj", crc32c=crc32c_of_file(theirs), generation=0)
    with pytest.raises(PreconditionFailed):
        blob = env_client().bucket(gcs_bucket).blob("p/obj")
        blob.chunk_size = 256 * 1024
        blob.upload_from_filename(str(theirs), if_generation_match=0)
    assert backend.stat("obj") == first and backend.read_bytes("obj") == mine.read_bytes()


def test_a_write_naming_a_stale_generation_is_refused(gcs_bucket: str) -> None:
    backend = fast_retry(open_backend(f"gs://{gcs_bucket}/p"))
    first = backend.write_bytes("latest", b"global_step1", generation=0)
    # a replacement
    second = backend.write_bytes("latest", b"global_step2", generation=first.generation)
    assert second.generation != first.generation
    with pytest.raises(RemoteChanged,
                       match=f"changed remotely \\(generation {second.generation}, expected "):
        backend.write_bytes("latest", b"global_step3", generation=first.generation)
    with pytest.raises(RemoteChanged, match="not deleted"):
        backend.delete("latest", generation=first.generation)
    assert backend.read("latest") == (b"global_step2", second.generation)
    # The other preconditions, on the plain client: a stale generation read, a *NotMatch, a
    # metageneration.
    blob = env_client().bucket(gcs_bucket).blob("p/latest")
    with pytest.raises(PreconditionFailed):
        blob.download_as_bytes(if_generation_match=first.generation)
    with pytest.raises(NotModified):
        blob.download_as_bytes(if_generation_not_match=second.generation)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"x", if_generation_not_match=second.generation)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"x", if_generation_match=second.generation,
                                if_metageneration_match=7)
    with pytest.raises(PreconditionFailed):
        env_client().bucket(gcs_bucket).blob("p/absent").upload_from_string(
            b"x", if_generation_match=second.generation)
    assert backend.read("latest") == (b"global_step2", second.generation)


def test_a_resumable_upload_is_checked_again_when_it_finishes(
        gcs_bucket: str, gcs_emulator: Emulator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened while the name was free; someone else creates the object before the last chunk: GCS
    refuses the finishing PUT (412), and the object stays theirs. A retry of that PUT is refused
    too."""
    from google.cloud.storage._media.requests.upload import ResumableUpload

    backend = fast_retry(open_backend(f"gs://{gcs_bucket}/p"))
    force_resumable(monkeypatch, backend)
    mine = tmp_path / "mine"
    mine.write_bytes(os.urandom(BIG))
    theirs = os.urandom(1000)
    real = ResumableUpload.transmit_next_chunk
    chunks: list[str] = []

    def meanwhile(self, transport, *args, **kwargs):
        # after the session was opened, before any byte: another writer creates the object
        if not chunks:
            direct_client(gcs_emulator.url).bucket(gcs_bucket).blob("p/obj").upload_from_string(
                theirs, if_generation_match=0)
        chunks.append(self.resumable_url)
        return real(self, transport, *args, **kwargs)

    monkeypatch.setattr(ResumableUpload, "transmit_next_chunk", meanwhile)
    with pytest.raises(RemoteChanged, match="already exists with different content"):
        backend.upload_file(mine, "obj", crc32c=crc32c_of_file(mine), generation=0)
    # via the layer
    assert len(chunks) == 3 and urlsplit(chunks[0]).netloc == urlsplit(gcs_emulator.url).netloc
    assert backend.read_bytes("obj") == theirs

    # The same on a raw session: opened, overtaken, finished: 412, and again on a retry.
    blob = direct_client(gcs_emulator.url).bucket(gcs_bucket).blob("p/raw")
    session = blob.create_resumable_upload_session(size=5, if_generation_match=0)
    assert urlsplit(session).netloc == urlsplit(gcs_emulator.url).netloc
    direct_client(gcs_emulator.url).bucket(gcs_bucket).blob("p/raw").upload_from_string(
        b"other", if_generation_match=0)
    for _ in range(2):
        assert requests.put(session, data=b"mine!",
                            headers={"Content-Range": "bytes 0-4/5"}).status_code == 412
    assert backend.read_bytes("raw") == b"other"


# --------------------------------------------------------------------------------------------------
# racing writers


@pytest.mark.parametrize("size", [100, BIG], ids=["multipart", "resumable"])
@pytest.mark.parametrize("replace", [False, True], ids=["create", "replace"])
def test_of_concurrent_conditional_writers_exactly_one_wins(gcs_bucket: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            size: int, replace: bool) -> None:
    """Four writers of one name at once, each naming the same generation (0: create; G: replace G):
    one write lands, three get 412, and the object holds the winner's bytes. Resumable ones all open
    their sessions while the precondition holds, so only the check at the finishing PUT (under the
    object's lock) can tell them apart."""
    import google.cloud.storage.blob as blob_module

    monkeypatch.setattr(blob_module, "_MAX_MULTIPART_SIZE", 256 * 1024)
    generation = 0
    if replace:
        old = env_client().bucket(gcs_bucket).blob("race")
        old.upload_from_string(b"old", if_generation_match=0)
        generation = old.generation
    writers = 4
    payloads = [bytes([i]) * size for i in range(writers)]
    start = threading.Barrier(writers)
    outcome: dict[int, str] = {}

    def write(i: int) -> None:
        blob = env_client().bucket(gcs_bucket).blob("race")
        blob.chunk_size = 256 * 1024
        start.wait()
        try:
            blob.upload_from_string(payloads[i], if_generation_match=generation)
            outcome[i] = "won"
        except PreconditionFailed:
            outcome[i] = "412"
        except Exception as e:  # noqa: BLE001 - reported below
            outcome[i] = repr(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, o in outcome.items() if o == "won"]
    assert (len(winners) == 1
            and sorted(outcome.values()) == ["412"] * (writers - 1) + ["won"]), outcome
    assert env_client().bucket(gcs_bucket).blob("race").download_as_bytes() == payloads[winners[0]]


# --------------------------------------------------------------------------------------------------
# two `neox-sync --checkpoints` at once


def watch_generations(client: storage.Client, bucket: str, prefix: str, stop: threading.Event,
                      seen: dict[str, set[int]]) -> None:
    """Every generation of every COMPLETE and manifest object under prefix, as often as the emulator
    answers."""
    while not stop.is_set():
        try:
            for blob in client.list_blobs(bucket, prefix=prefix):
                if blob.name.endswith((f"/{COMPLETE}", f"/{MANIFEST}")):
                    seen[blob.name].add(blob.generation)
        except Exception:  # noqa: BLE001 - a busy emulator: look again (the layer's record is the main evidence)
            pass
        time.sleep(0.01)


class SlowFirstComplete:
    """Layer latency: the first request to write each tag's COMPLETE waits `seconds` (a slow
    request, as a busy bucket has them); later ones do not. So a process a step behind catches up
    with the one ahead and looks at a tag between its manifest and its COMPLETE: the window a real
    double run hits now and then, made likely."""

    def __init__(self, bucket: str, seconds: float):
        self.bucket, self.seconds, self.seen, self.lock = bucket, seconds, set(), threading.Lock()

    def __call__(self, _method: str, op) -> float:
        if (op.bucket != self.bucket or not op.name.endswith(f"/{COMPLETE}")
                or op.kind not in ("write", "start")):
            return 0.0
        with self.lock:
            first = op.name not in self.seen
            self.seen.add(op.name)
        return self.seconds if first else 0.0


@pytest.mark.parametrize("copies", [1, 2], ids=["one-save-dir", "two-copies-of-it"])
def test_two_neox_sync_checkpoints_at_once_write_each_marker_once(
        gcs_bucket: str, gcs_emulator: Emulator, tmp_path: Path, copies: int) -> None:
    """Two hand-run `neox-sync --checkpoints SAVE gs://BUCKET/P` at the same moment (on one save
    dir, or on two identical copies of it, as on two machines): no COMPLETE or manifest.json is ever
    written twice (the layer saw one generation created of each, the emulator never held another),
    each process exits 0 or with one-line reasons, and the result verifies: every manifest file is
    there with its crc32c, `latest` names the last tag. The first write of each COMPLETE is slowed
    (SlowFirstComplete), so that the two processes meet in the window between a tag's manifest and
    its COMPLETE."""
    save = tmp_path / "save"
    tags = [f"global_step{i}" for i in range(1, 6)]
    for i, tag in enumerate(tags):
        files = {f"mp_rank_00_model_states_{k}.pt": os.urandom(3000) for k in range(6)}
        if i == 0:
            # over 8 MiB: a resumable upload
            files["zero/optim_states.pt"] = os.urandom(9 * 1024 * 1024)
        save_checkpoint(save, tag, files)
    dirs = [save] if copies == 1 else [save, tmp_path / "copy"]
    if copies == 2:
        # copy2: the same bytes and mtimes, the same run id in each marker
        shutil.copytree(save, dirs[1])
    layer = gcs_emulator.layer
    assert layer is not None
    created_before = len(layer.created)
    seen: dict[str, set[int]] = defaultdict(set)
    stop = threading.Event()
    watcher = threading.Thread(target=watch_generations,
                               args=(direct_client(gcs_emulator.emulator_url), gcs_bucket, "P/",
                                     stop, seen))
    watcher.start()
    layer.latency = SlowFirstComplete(gcs_bucket, 0.4)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.url}
    exe = str(Path(sys.executable).parent / "neox-sync")
    try:
        procs = [subprocess.Popen([exe, str(dirs[i % len(dirs)]), f"gs://{gcs_bucket}/P",
                                   "--checkpoints", "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True) for i in range(2)]
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        layer.latency = None
        stop.set()
        watcher.join(30)
    report = "\n".join(f"--- neox-sync #{i}: exit {p.returncode}\n{err}{out}"
                       for i, (p, (out, err)) in enumerate(zip(procs, results)))
    print(report)  # (shown with -rA)
    for p, (_out, err) in zip(procs, results):
        assert "Traceback" not in err, report
        # one line per problem
        assert all(line.startswith("neox-sync: ") for line in err.splitlines()), report
        if p.returncode != 0:  # a refusal says why
            assert p.returncode in (1, 2) and err.strip(), report
    assert min(p.returncode for p in procs) == 0, report  # and at least one of them published

    writes: dict[str, list[int]] = defaultdict(list)
    for bucket, name, gen in layer.created[created_before:]:
        if bucket == gcs_bucket:
            writes[name].append(gen)
    listing = {b.name: b for b in direct_client(gcs_emulator.emulator_url).list_blobs(
        gcs_bucket, prefix="P/")}
    rewritten = {}
    for tag in tags:
        for marker in (MANIFEST, COMPLETE):
            name = f"P/{tag}/{marker}"
            assert name in listing, f"{name} missing\n{report}"
            final = listing[name].generation
            if writes[name] != [final] or seen[name] - {final}:
                rewritten[name] = {"created": writes[name], "seen": sorted(seen[name]),
                                   "final": final}
    assert not rewritten, f"written more than once: {json.dumps(rewritten, indent=1)}\n{report}"

    bucket = direct_client(gcs_emulator.emulator_url).bucket(gcs_bucket)
    for tag in tags:
        manifest = json.loads(bucket.blob(f"P/{tag}/{MANIFEST}").download_as_bytes())
        local = {
            p.relative_to(save / tag).as_posix(): p for p in (save / tag).rglob("*") if p.is_file()}
        assert (manifest["tag"] == tag
                and set(local) - set(manifest["files"]) == {commit.MARKER}), report
        for rel, meta in manifest["files"].items():
            blob = listing.get(f"P/{tag}/{rel}")
            assert (blob is not None
                    and blob.crc32c == meta["crc32c"] == crc32c_of_file(local[rel])), (tag, rel)
            assert int(blob.size) == meta["size"]
    assert bucket.blob("P/latest").download_as_bytes() == tags[-1].encode()


def test_a_capped_proxy_paces_each_connection_and_keeps_chunks_on_it(
        tmp_path: Path, gcs_emulator: Emulator, gcs_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """cap_bytes_per_s, the bucket the transfer benches and tests measure against: one connection
    moves no faster than the cap, in both directions; a resumable upload's chunks all come through
    the proxy (its Location is rewritten); two connections at once each get the whole cap."""
    cap = 1 << 20  # 1 MiB/s
    data = os.urandom(3 << 19)  # 1.5 MiB: at least 1.5 s through one capped connection
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    with FaultProxy(gcs_emulator.url, cap_bytes_per_s=cap) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}/capped"))
        force_resumable(monkeypatch, backend)  # 6 chunks of 256 KiB, one connection each
        started = time.monotonic()
        backend.upload_file(local, "big.bin", crc32c=None, generation=0)
        up_s = time.monotonic() - started
        chunks = [t for m, t, _ in proxy.log if m == "PUT" and "upload_id=" in t]
        assert len(chunks) == 6, proxy.log  # every chunk went through the proxy, none around it
        assert up_s >= 0.9 * len(data) / cap, up_s  # 256 KiB at 1 MiB/s each: 1.5 s in all

        started = time.monotonic()
        assert backend.read_bytes("big.bin") == data
        down_s = time.monotonic() - started
        assert down_s >= 0.9 * len(data) / cap, down_s

        # Two downloads at once: the cap is per connection, so they overlap instead of taking turns.
        spans: list[tuple[float, float]] = []

        def fetch() -> None:
            began = time.monotonic()
            assert direct_client(proxy.url).bucket(gcs_bucket).blob(
                "capped/big.bin").download_as_bytes() == data
            spans.append((began, time.monotonic()))

        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(spans) == 2
        (a0, a1), (b0, b1) = spans
        overlap = min(a1, b1) - max(a0, b0)
        assert overlap >= 0.5 * min(a1 - a0, b1 - b0), spans
    assert not proxy.errors, proxy.errors


def test_a_large_object_comes_down_in_slices_checked_by_its_crc32c(
        tmp_path: Path, gcs_emulator: Emulator, gcs_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22 item 2: above sliced_min_bytes an object comes down as concurrent ranged reads of
    that generation, each hashed as it arrives; the combined crc32c must be the object's. A slice
    whose request is reset is retried."""
    data = os.urandom(3 << 19)  # 1.5 MiB: 6 slices of 256 KiB
    with FaultProxy(gcs_emulator.url, cap_bytes_per_s=4 << 20,
                    rules={r"GET .*alt=media": ["pass", "pass", "reset"]}) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}/sliced"))
        backend.slice_bytes, backend.sliced_min_bytes = 256 * 1024, 512 * 1024
        written = backend.write_bytes("big.bin", data, generation=0)
        dest = tmp_path / "out" / "big.bin"
        assert backend.download_file("big.bin", dest) == written.crc32c == crc32c_of_file(dest)
        assert dest.read_bytes() == data
        media = [t for m, t, a in proxy.log if m == "GET" and "alt=media" in t]
        assert len(media) == 6 + 1, proxy.log  # one slice each, and the reset one again
        assert ("GET", media[2], "reset") in proxy.log
        assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]
        # What came down must hash to what GCS reports: a mismatch is refused.
        with pytest.raises(StorageError, match="came down with crc32c"):
            download_sliced(backend._read_range,
                            RemoteFile("big.bin", len(data), "AAAAAA==", written.generation),
                            tmp_path / "bad.bin", where="big.bin", slice_bytes=256 * 1024,
                            streams=4)
        small = backend.write_bytes("small.bin", b"x" * 1000, generation=0)
        assert backend.download_file("small.bin", tmp_path / "small.bin") == small.crc32c
    assert not proxy.errors, proxy.errors
