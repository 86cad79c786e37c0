"""Parallel composite uploads (remote/composite.py) against the real client and the test server:
parts on concurrent streams, composed under the final name's write condition, checked by crc32c,
never visible as files, and removed (now, or by the next process after a kill -9); a bucket that
refuses the path gets one stream per file and one WARNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neox_train.remote import open_backend
from neox_train.remote.base import RemoteChanged
from neox_train.remote.composite import (
    MAX_COMPOSE_SOURCES,
    PARTS_DIR,
    FileRange,
    PartsJournal,
    plan_parts,
    refuses_parts,
)
from neox_train.remote.files import crc32c_of_file
from neox_train.remote.rsync import sync_down

from gcs import FaultProxy, direct_client, fast_retry, gcs_bucket, gcs_emulator  # noqa: F401

MiB = 1 << 20
# a part opens a resumable upload (the files of these tests are composed, so only parts do)
PART_UPLOAD = r"POST /upload/storage/v1/b/[^/]+/o\?.*uploadType=resumable"
PART_PUT = r"PUT /upload/storage/v1/b/[^/]+/o\?.*upload_id="
COMPOSE = r"POST /storage/v1/b/[^/]+/o/.+/compose"
SLICE_READ = r"GET /download/storage/v1/b/[^/]+/o/.+generation="


def small_parts(backend):
    """Parts from 1 MiB files up, no smaller than 256 KiB: a 2-4 MiB test file takes the path a
    multi-GB checkpoint file takes."""
    backend.parallel.min_bytes, backend.parallel.min_part = MiB, 256 * 1024
    return backend


def stored_names(emulator_url: str, bucket: str) -> list[str]:
    """Every object in the bucket, asked of the emulator itself (nothing filtered)."""
    return sorted(b.name for b in direct_client(emulator_url).list_blobs(bucket))


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def proxied(gcs_emulator, gcs_bucket, monkeypatch):
    """(bucket, make_proxy): the client goes through a FaultProxy of the test's rules, in front of
    the precondition-enforcing layer."""
    proxies = []

    def make(rules=None, stall_s: float = 0.2, **kw) -> FaultProxy:
        proxy = FaultProxy(gcs_emulator.url, rules=rules, stall_s=stall_s, **kw)
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        return proxy

    yield gcs_bucket, make
    for proxy in proxies:
        proxy.close()


def gs(bucket: str, tmp_path: Path, *, streams: int = 4, **kw):
    return small_parts(fast_retry(open_backend(f"gs://{bucket}/run", streams=streams,
                                               parts_journal=tmp_path / "journal.jsonl", **kw)))


def requests_matching(proxy: FaultProxy, pattern: str) -> int:
    import re

    return sum(1 for method, target, _ in proxy.log if re.search(pattern, f"{method} {target}"))


def test_plan_parts_one_per_stream_within_the_compose_limit():
    for size, streams in [(256 * MiB, 16), (17_000_000_000, 16), (63_000_000, 16),
                          (5 * MiB, 8), (10**9, 64), (MiB, 1)]:
        spans = plan_parts(size, streams)
        assert sum(length for _, length in spans) == size
        assert all(a + la == b for (a, la), (b, _) in zip(spans, spans[1:]))  # contiguous
        assert 1 <= len(spans) <= min(streams, MAX_COMPOSE_SOURCES)
        assert len(spans) == 1 or min(length for _, length in spans[:-1]) >= 4 * MiB
    assert len(plan_parts(256 * MiB, 16)) == 16
    assert len(plan_parts(63_000_000, 16)) == 15
    assert len(plan_parts(10**9, 64)) == MAX_COMPOSE_SOURCES


def test_file_range_reads_and_seeks_inside_its_span(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    with FileRange(path, 10, 20) as f:
        assert f.read(5) == bytes(range(10, 15))
        assert f.tell() == 5
        assert f.read() == bytes(range(15, 30))
        assert f.read() == b""
        f.seek(0)
        assert f.read(100) == bytes(range(10, 30))
        f.seek(-3, os.SEEK_END)
        assert f.read() == bytes(range(27, 30))


def test_buckets_whose_parts_could_not_be_deleted_get_none():
    assert "retention policy" in refuses_parts(3600, None, "STANDARD")
    assert "event-based hold" in refuses_parts(None, True, "STANDARD")
    assert "COLDLINE" in refuses_parts(None, False, "COLDLINE")
    assert refuses_parts(None, False, "STANDARD") == refuses_parts(0, None, None) == ""


def test_journal_leftovers_are_uploads_of_gone_processes(tmp_path):
    journal = PartsJournal(tmp_path / "j.jsonl")
    journal.begun("gs://b/p", "mine-ended")
    journal.ended("mine-ended")
    journal.begun("gs://b/other", "other-url")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(journal.path, "a") as f:
            for uid, pid in (("dead", dead.pid), ("live", live.pid)):
                f.write(json.dumps({"begun": uid, "url": "gs://b/p", "pid": pid,
                                    "host": os.uname().nodename}) + "\n")
            f.write('{"begun": "torn')  # a kill -9 mid-write
        assert journal.leftovers("gs://b/p") == ["dead"]
    finally:
        live.kill()
        live.wait()


def test_large_file_goes_up_in_parts_and_only_the_file_remains(proxied, gcs_emulator, tmp_path):
    bucket, make = proxied
    proxy = make()
    backend = gs(bucket, tmp_path)
    src = random_file(tmp_path / "optim.pt", 3 * MiB + 12345)
    stored = backend.upload_file(src, "global_step2/optim.pt", crc32c=None, generation=0)
    assert (stored.size, stored.crc32c) == (src.stat().st_size, crc32c_of_file(src))
    assert requests_matching(proxy, PART_UPLOAD) == 4 and requests_matching(proxy, COMPOSE) == 1
    # the parts are gone, the journal says so, and no listing ever shows them
    assert stored_names(gcs_emulator.emulator_url, bucket) == ["run/global_step2/optim.pt"]
    records = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [next(iter(r)) for r in records] == ["begun", "ended"]
    # with a known crc32c (the save-time hash), a second upload is checked against it
    again = backend.upload_file(src, "global_step4/optim.pt", crc32c=stored.crc32c, generation=0)
    assert again.crc32c == stored.crc32c
    back = tmp_path / "back.pt"
    assert backend.download_file("global_step4/optim.pt", back) == stored.crc32c
    assert back.read_bytes() == src.read_bytes()


def test_faults_during_parts_compose_and_ranged_reads_change_nothing(proxied, gcs_emulator,
                                                                    tmp_path):
    bucket, make = proxied
    proxy = make({PART_UPLOAD: ["503", "pass", "reset"], PART_PUT: ["stall", "pass", "503"],
                  COMPOSE: ["503", "lost"], SLICE_READ: ["reset", "pass", "503", "stall"]},
                 max_requests=None)
    backend = gs(bucket, tmp_path)
    backend.slice_bytes, backend.sliced_min_bytes = 512 * 1024, MiB
    src = random_file(tmp_path / "optim.pt", 4 * MiB - 7)
    stored = backend.upload_file(src, "global_step2/optim.pt", crc32c=None, generation=0)
    assert stored.crc32c == crc32c_of_file(src)
    back = tmp_path / "back.pt"
    assert backend.download_file("global_step2/optim.pt", back) == stored.crc32c
    assert back.read_bytes() == src.read_bytes()
    assert proxy.counts["503"] >= 4 and proxy.counts["reset"] >= 2 and proxy.counts["stall"] >= 2
    assert proxy.counts["lost"] == 1  # the compose landed, its answer was lost: recognised
    assert stored_names(gcs_emulator.emulator_url, bucket) == ["run/global_step2/optim.pt"]
    assert not proxy.errors


def test_compose_keeps_the_final_names_write_condition(proxied, gcs_emulator, tmp_path):
    bucket, make = proxied
    make()
    backend = gs(bucket, tmp_path)
    theirs = backend.write_bytes("global_step2/optim.pt", b"someone else's", generation=0)
    src = random_file(tmp_path / "optim.pt", 2 * MiB)
    with pytest.raises(RemoteChanged, match="refusing to overwrite"):
        backend.upload_file(src, "global_step2/optim.pt", crc32c=None, generation=0)
    assert backend.stat("global_step2/optim.pt") == theirs
    assert stored_names(gcs_emulator.emulator_url, bucket) == ["run/global_step2/optim.pt"]


def test_a_bucket_refusing_compose_gets_one_stream_per_file_and_one_warning(
        proxied, gcs_emulator, tmp_path, capsys):
    bucket, make = proxied
    proxy = make({COMPOSE: ["403"] * 5})
    backend = gs(bucket, tmp_path)
    first, second = (random_file(tmp_path / f"f{i}", 2 * MiB + i) for i in range(2))
    for i, src in enumerate((first, second)):
        stored = backend.upload_file(src, f"global_step2/f{i}", crc32c=None, generation=0)
        assert stored.crc32c == crc32c_of_file(src)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "parallel upload refused" in warnings[0]
    assert "one stream each" in warnings[0]
    assert requests_matching(proxy, COMPOSE) == 1  # the second file never tried
    assert stored_names(gcs_emulator.emulator_url, bucket) == ["run/global_step2/f0",
                                                                "run/global_step2/f1"]


def test_a_bucket_with_a_retention_policy_gets_no_parts(proxied, gcs_emulator, tmp_path, capsys):
    bucket, make = proxied
    b = direct_client(gcs_emulator.emulator_url).get_bucket(bucket)
    b.retention_period = 3600
    b.patch()
    proxy = make()
    backend = gs(bucket, tmp_path)
    src = random_file(tmp_path / "f", 2 * MiB)
    assert backend.upload_file(src, "x/f", crc32c=None, generation=0).crc32c == crc32c_of_file(src)
    assert requests_matching(proxy, PART_UPLOAD) == 0
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "retention policy (3600 s)" in err


def test_parts_never_show_in_listings_or_downloads(proxied, gcs_emulator, tmp_path):
    bucket, make = proxied
    make()
    backend = gs(bucket, tmp_path)
    backend.write_bytes("data/shard.bin", b"tokens", generation=0)
    backend.write_bytes(f"{PARTS_DIR}/20260101T000000-abc/00", b"a part", generation=0)
    assert set(backend.list("")) == {"data/shard.bin"}
    assert backend.list_parts(f"{PARTS_DIR}/") == [f"{PARTS_DIR}/20260101T000000-abc/00"]
    sync_down(backend, "", tmp_path / "down")
    assert [p.name for p in (tmp_path / "down").rglob("*") if p.is_file()] == ["shard.bin"]


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from neox_train.remote import open_backend
    backend = open_backend(sys.argv[1], streams=2, parts_journal=Path(sys.argv[2]))
    backend.parallel.min_bytes, backend.parallel.min_part = 1 << 20, 256 * 1024
    backend.upload_file(Path(sys.argv[3]), "global_step2/optim.pt", crc32c=None, generation=0)
""")


def test_parts_a_killed_upload_left_are_removed_by_the_next_upload(proxied, gcs_emulator,
                                                                   tmp_path):
    bucket, make = proxied
    # the compose hangs (30 s, then a reset): the parts are in, the file is not; then kill -9
    proxy = make({COMPOSE: ["stall"]}, stall_s=30.0)
    src = random_file(tmp_path / "optim.pt", 2 * MiB)
    journal = tmp_path / "journal.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"gs://{bucket}/run", str(journal),
                              str(src)], env=dict(os.environ), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    parts: list[str] = []
    while not requests_matching(proxy, COMPOSE) and time.monotonic() < deadline \
            and child.poll() is None:
        time.sleep(0.05)
    parts = [n for n in stored_names(gcs_emulator.emulator_url, bucket) if PARTS_DIR in n]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(parts) == 2, (f"the parts did not land before the compose: "
                             f"{child.stderr.read().decode()[-2000:]}")
    assert "ended" not in journal.read_text()
    assert "run/global_step2/optim.pt" not in stored_names(gcs_emulator.emulator_url, bucket)

    backend = gs(bucket, tmp_path)  # the next process, same journal, same prefix
    assert set(backend.list("")) == set()  # what the kill left is nobody's file
    backend.write_bytes("unrelated", b"x", generation=0)  # not an upload_file: nothing swept yet
    backend.upload_file(random_file(tmp_path / "small", 100), "small", crc32c=None, generation=0)
    assert stored_names(gcs_emulator.emulator_url, bucket) == ["run/small", "run/unrelated"]
    assert "ended" in journal.read_text()


def test_a_bucket_refusing_to_delete_parts_gets_no_more_and_the_next_run_retries(
        proxied, gcs_emulator, tmp_path):
    bucket, make = proxied
    make({r"DELETE /storage/v1/b/[^/]+/o/[^?]*neox-parts": ["403"] * 8})
    first, second = (random_file(tmp_path / f"f{i}", 2 * MiB + i) for i in range(2))
    journal = tmp_path / "journal.jsonl"
    run = subprocess.run([sys.executable, "-c", TWO_UPLOADS, f"gs://{bucket}/run", str(journal),
                          str(first), str(second)], env=dict(os.environ), capture_output=True,
                         text=True, check=True)
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "parts cannot be deleted" in warnings[0], run.stderr[-2000:]
    names = stored_names(gcs_emulator.emulator_url, bucket)
    assert len([n for n in names if PARTS_DIR in n]) == 4  # the first file's; the second had none
    assert {"run/t/f0", "run/t/f1"} <= set(names)
    make()  # permission back: the next process through the same journal deletes them
    subprocess.run([sys.executable, "-c", NEXT_UPLOAD, f"gs://{bucket}/run", str(journal),
                    str(random_file(tmp_path / "small", 10))], env=dict(os.environ), check=True)
    assert stored_names(gcs_emulator.emulator_url, bucket) == ["run/small", "run/t/f0", "run/t/f1"]


TWO_UPLOADS = textwrap.dedent("""
    import sys
    from pathlib import Path
    from neox_train.remote import open_backend
    backend = open_backend(sys.argv[1], streams=4, parts_journal=Path(sys.argv[2]))
    backend.parallel.min_bytes, backend.parallel.min_part = 1 << 20, 256 * 1024
    for i, src in enumerate(sys.argv[3:]):
        backend.upload_file(Path(src), f"t/f{i}", crc32c=None, generation=0)
""")


# another process's first upload through the journal: it deletes what earlier processes left
NEXT_UPLOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from neox_train.remote import open_backend
    backend = open_backend(sys.argv[1], parts_journal=Path(sys.argv[2]))
    backend.upload_file(Path(sys.argv[3]), "small", crc32c=None, generation=0)
""")


def test_the_sweep_never_takes_this_processs_own_uploads_in_flight(tmp_path):
    """One thread's first upload sweeps the journal while another thread of the same process is
    sending parts: those are not leftovers. A dead process whose pid this one reuses left some."""
    journal = PartsJournal(tmp_path / "j.jsonl")
    journal.begun("gs://b/p", "mine-in-flight")
    with open(journal.path, "a") as f:
        f.write(json.dumps({"begun": "reused-pid", "url": "gs://b/p", "pid": os.getpid(),
                            "process": "another", "host": os.uname().nodename}) + "\n")
    assert journal.leftovers("gs://b/p") == ["reused-pid"]
