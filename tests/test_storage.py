"""Storage backends: URL parsing, crc32c as GCS reports it, the crc32c cache, the Backend contract
on the real client against the real emulator and on a local folder, conditional writes (generations,
412), transient vs permanent errors, and probe's one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import neox_train.remote.files as storage
from neox_train.errors import StorageError
from neox_train.remote import open_backend
from neox_train.remote.base import RemoteChanged, parse_url
from neox_train.remote.files import Crc32cCache, crc32c_of_file
from neox_train.remote.gcs import GcsBackend
from neox_train.remote.local import LocalBackend

from gcs import (  # noqa: F401
    FaultProxy,
    backend,
    direct_client,
    fast_retry,
    force_resumable,
    free_port,
    gcs_bucket,
    gcs_emulator,
    strict_backend,
)


@pytest.mark.parametrize("url, expected", [
    ("gs://bkt-1/a/b/", ("gs", "bkt-1", "a/b")),
    ("gs://bkt-1", ("gs", "bkt-1", "")),
    ("file:///tmp/x", ("file", str(Path("/tmp/x").resolve()), "")),
    ("rel/dir", ("file", str(Path("rel/dir").resolve()), "")),
])
def test_parse_url(url: str, expected: tuple[str, str, str]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url, needle", [
    ("s3://b/x", "unsupported URL scheme 's3'"),
    ("gs://Bad_Bucket!/x", "not a valid bucket name"),
    ("gs://bkt-1/a//b", "empty, '.' or '..' parts"),
    ("file://otherhost/x", "not host 'otherhost'"),
    ("", "empty storage URL"),
])
def test_parse_url_errors_areone_line(url: str, needle: str) -> None:
    with pytest.raises(StorageError, match=needle) as err:
        parse_url(url)
    assert "\n" not in str(err.value)


def test_crc32c_is_what_gcs_reports(gcs_bucket: str, gcs_emulator, tmp_path: Path) -> None:
    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    # > one 1 MiB read
    for i, data in enumerate([b"", b"hello world", os.urandom(3 * 1024 * 1024 + 7)]):
        path = tmp_path / f"f{i}"
        path.write_bytes(data)
        blob = bucket.blob(f"f{i}")
        blob.upload_from_string(data)
        assert crc32c_of_file(path) == blob.crc32c
    assert crc32c_of_file(tmp_path / "f0") == "AAAAAA=="


def test_crc32c_cache_reads_each_unchanged_file_once(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = storage.crc32c_of_file
    monkeypatch.setattr(storage, "crc32c_of_file", lambda p: reads.append(Path(p)) or real(p))
    f = tmp_path / "ckpt" / "w.bin"
    f.parent.mkdir()
    f.write_bytes(b"x" * 100)
    cache_file = tmp_path / "state" / "crc.json"

    cache = Crc32cCache(cache_file)
    crc = cache.get(f)
    assert cache.get(f) == crc and len(reads) == 1 and (cache.hits, cache.misses) == (1, 1)
    cache.save()

    again = Crc32cCache(cache_file)  # a new process: the persisted entry still hits
    assert again.get(f) == crc and len(reads) == 1 and again.hits == 1

    f.write_bytes(b"y" * 100)  # same size, new content and mtime
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert again.get(f) != crc and len(reads) == 2

    f.unlink()
    again.save()  # entries of deleted files are pruned
    assert json.loads(cache_file.read_text())["files"] == {}


def test_crc32c_cache_survives_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "crc.json").write_text("{not json")
    (tmp_path / "f").write_bytes(b"abc")
    assert Crc32cCache(tmp_path / "crc.json").get(tmp_path / "f") == crc32c_of_file(tmp_path / "f")


def test_backend_contract(backend, tmp_path: Path) -> None:
    assert (backend.read_bytes("absent") is None and backend.read("absent") is None
            and backend.stat("absent") is None)
    written = backend.write_bytes("a/x.json", b"{}", generation=0)
    assert written.generation > 0 and backend.stat("a/x.json") == written
    assert backend.read("a/x.json") == (b"{}", written.generation)
    backend.write_bytes("a1/y", b"yy", generation=0)
    src = tmp_path / "src.bin"
    src.write_bytes(b"0123456789")
    backend.upload_file(src, "a/deep/z.bin", crc32c=crc32c_of_file(src), generation=0)

    listing = backend.list("")
    assert set(listing) == {"a/x.json", "a1/y", "a/deep/z.bin"}
    assert (listing["a/deep/z.bin"].size == 10
            and listing["a/deep/z.bin"].crc32c == crc32c_of_file(src))
    assert set(backend.list("a/")) == {"a/x.json", "a/deep/z.bin"}  # a folder prefix, not a1/
    # a string prefix, as in GCS
    assert set(backend.list("a")) == {"a/x.json", "a/deep/z.bin", "a1/y"}

    dest = tmp_path / "out" / "nested" / "z.bin"
    # the crc32c of the bytes as they arrived
    assert backend.download_file("a/deep/z.bin", dest) == crc32c_of_file(src)
    assert dest.read_bytes() == b"0123456789"
    assert [p.name for p in dest.parent.iterdir()] == ["z.bin"]  # no temporary file left behind
    assert backend.read_bytes("a/x.json") == b"{}"

    backend.delete("a/x.json", generation=None)
    backend.delete("a/x.json", generation=None)  # absent is fine
    assert set(backend.list("")) == {"a1/y", "a/deep/z.bin"}
    with pytest.raises(StorageError, match="does not exist"):
        backend.download_file("a/x.json", tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
    backend.probe()
    assert not any(n.startswith(".neox-probe-") for n in backend.list(""))


def test_gcs_names_stay_under_the_prefix(gcs_bucket: str, gcs_emulator) -> None:
    fast_retry(open_backend(f"gs://{gcs_bucket}/p/q/")).write_bytes("x/y", b"1", generation=0)
    assert [b.name for b in direct_client(gcs_emulator.url).list_blobs(gcs_bucket)] == ["p/q/x/y"]


@pytest.mark.parametrize("size", [100, 600 * 1024], ids=["multipart", "resumable"])
def test_writes_are_conditional_on_the_generation(strict_backend, tmp_path: Path,
                                                  size: int) -> None:
    """generation=0 creates only; generation=G replaces only G; a refused write that finds exactly
    its own content there counts as written (an earlier attempt landed); anything else is
    RemoteChanged and changes nothing."""
    backend, proxy = strict_backend
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    for f in (a, b, c):
        f.write_bytes(os.urandom(size))
    first = backend.upload_file(a, "obj", crc32c=crc32c_of_file(a), generation=0)
    # landed already
    assert backend.upload_file(a, "obj", crc32c=crc32c_of_file(a), generation=0) == first
    with pytest.raises(RemoteChanged, match="already exists with different content.*refusing to "
                                            "overwrite") as err:
        backend.upload_file(b, "obj", crc32c=crc32c_of_file(b), generation=0)
    assert "\n" not in str(err.value) and err.value.transient
    assert backend.list("")["obj"].crc32c == crc32c_of_file(a)
    # a replacement
    second = backend.upload_file(b, "obj", crc32c=crc32c_of_file(b), generation=first.generation)
    assert (second.generation != first.generation
            and backend.list("")["obj"].crc32c == crc32c_of_file(b))
    # someone else's write came in between
    with pytest.raises(RemoteChanged, match="changed remotely"):
        backend.upload_file(c, "obj", crc32c=crc32c_of_file(c), generation=first.generation)
    assert backend.stat("obj") == second
    with pytest.raises(RemoteChanged, match="not deleted"):
        backend.delete("obj", generation=first.generation)
    backend.delete("obj", generation=second.generation)
    assert backend.stat("obj") is None

    backend.write_bytes("COMPLETE", b"done", generation=0)
    backend.write_bytes("COMPLETE", b"done", generation=0)
    with pytest.raises(RemoteChanged, match="already exists with different content"):
        backend.write_bytes("COMPLETE", b"other", generation=0)
    assert backend.read_bytes("COMPLETE") == b"done"
    if proxy is not None:
        assert proxy.counts["412"] == 6
        resumable = [t for m, t, _a in proxy.log if m == "POST" and "uploadType=resumable" in t]
        # the 412 arrives when the session is opened
        assert len(resumable) == (5 if size > 256 * 1024 else 0)


def test_errors_say_whether_a_retry_can_help(gcs_bucket: str, gcs_emulator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload worker retries transient errors and gives a checkpoint up on permanent ones."""
    with FaultProxy(gcs_emulator.url,
                    rules={"^POST /upload/": ["403"], "^GET /storage/v1/b/[^/]+/o\\?": ["503"] * 50}
                    ) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}/x"), deadline_s=0.5)
        with pytest.raises(StorageError, match="no permission") as denied:
            backend.write_bytes("a", b"1", generation=0)
        assert not denied.value.transient
        with pytest.raises(StorageError, match="still failing after retrying") as flaky:
            backend.list("")
        assert flaky.value.transient
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    missing = fast_retry(open_backend("gs://neox-no-such-bucket-x/y"))
    with pytest.raises(StorageError, match="does not exist") as gone:
        missing.write_bytes("a", b"1", generation=0)
    assert not gone.value.transient


@pytest.mark.parametrize("size", [100, 600 * 1024], ids=["multipart", "resumable"])
def test_content_other_than_the_hashed_file_is_never_accepted(
        gcs_bucket: str, tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash taken before the upload is binding: if the bytes sent differ from it (the file
    changed after it was hashed), the upload fails, whether the client hashed while
    sending (multipart) or not (resumable: the crc32c is declared to GCS up front and the stored
    object's crc32c is compared after)."""
    backend = fast_retry(open_backend(f"gs://{gcs_bucket}/changed"))
    force_resumable(monkeypatch, backend)
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(size))
    hashed = crc32c_of_file(f)
    f.write_bytes(os.urandom(size))  # rewritten between hashing and uploading
    # multipart: the client compares the stored crc32c; resumable: GCS answers 400 "Provided CRC32C
    # ... doesn't match"
    with pytest.raises(StorageError, match=r"(?i)crc32c") as err:
        backend.upload_file(f, "f.bin", crc32c=hashed, generation=0)
    assert "\n" not in str(err.value)


def test_lost_response_then_412_counts_as_uploaded(gcs_bucket: str, gcs_emulator, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The case if_absent exists for: the upload lands, its response is lost, the client's retry
    gets 412."""
    with FaultProxy(gcs_emulator.url, rules={"^POST /upload/": ["lost"]},
                    enforce_preconditions=True) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}"))
        f = tmp_path / "w.bin"
        f.write_bytes(b"weights" * 100)
        backend.upload_file(f, "w.bin", crc32c=crc32c_of_file(f), generation=0)
        assert (proxy.counts["lost"], proxy.counts["412"]) == (1, 1) and backend.retries == 1
    assert (direct_client(gcs_emulator.url).bucket(gcs_bucket).get_blob("w.bin").crc32c
            == crc32c_of_file(f))


def test_local_backend_refuses_names_outside_its_folder(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "remote")
    for name in ["../x", "/abs", "a/../../b", "a\\b", "a//b"]:
        with pytest.raises(StorageError, match="escape the folder"):
            backend.write_bytes(name, b"x", generation=0)
    assert not (tmp_path / "x").exists()


def test_probe_nonexistent_bucket(gcs_bucket: str) -> None:
    backend = fast_retry(open_backend("gs://neox-no-such-bucket/ckpt"))
    with pytest.raises(StorageError, match=r"bucket neox-no-such-bucket does not exist") as err:
        backend.probe()
    assert "\n" not in str(err.value) and "gs://neox-no-such-bucket/ckpt" in str(err.value)


def test_probe_permission_denied(gcs_bucket: str, gcs_emulator,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultProxy(gcs_emulator.url, rules={"^POST /upload/": ["403"]}) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        with pytest.raises(StorageError,
                           match=rf"no permission to write gs://{gcs_bucket}/ckpt \(.*403"):
            fast_retry(open_backend(f"gs://{gcs_bucket}/ckpt")).probe()


def test_probe_unreachable_host_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    backend = fast_retry(open_backend("gs://some-bucket"), probe_deadline_s=0.5)
    with pytest.raises(StorageError, match=rf"cannot reach 127\.0\.0\.1:{port} to write "
                                           r"gs://some-bucket .*gave up"):
        backend.probe()


def test_credentials_file_errors_name_the_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    missing = tmp_path / "nope.json"
    with pytest.raises(StorageError, match=rf"credentials file {missing} does not exist"):
        open_backend("gs://some-bucket", credentials=str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(StorageError, match=rf"credentials file {bad} is not JSON"):
        open_backend("gs://some-bucket", credentials=str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"type": "service_account"}')
    with pytest.raises(StorageError,
                       match=rf"credentials file {wrong} is not a usable service_account key"):
        open_backend("gs://some-bucket", credentials=str(wrong))
    wrong.write_text('{"type": "nonsense"}')
    with pytest.raises(StorageError, match=rf"credentials file {wrong} has type 'nonsense' "
                                           r"\(valid: service_account"):
        open_backend("gs://some-bucket", credentials=str(wrong))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(StorageError, match=rf"file {missing} \(from "
                                           r"GOOGLE_APPLICATION_CREDENTIALS\) does not exist"):
        open_backend("gs://some-bucket")


def test_missing_default_credentials_say_how_to_provide_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_adc(*_a, **_k):  # the real lookup would also query the GCE metadata server: slow off GCP
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setattr(google.auth, "default", no_adc)
    with pytest.raises(StorageError, match=r"no Google Cloud credentials for gs://b-1/x: pass "
                                           r"--credentials FILE.*GOOGLE_APPLICATION_CREDENTIALS.*"
                                           r"gcloud auth application-default login"):
        open_backend("gs://b-1/x")


def test_local_probe_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="must be a writable folder"):
        open_backend(str(tmp_path / "afile")).probe()
    assert isinstance(open_backend(str(tmp_path / "d")), LocalBackend)
    assert not isinstance(open_backend(str(tmp_path / "d")), GcsBackend)


def test_crc32c_combine_gives_the_crc32c_of_the_joined_bytes() -> None:
    """Sliced downloads join their slices' crc32cs without the bytes: checked against google_crc32c
    on every split of a short input and on random splits of longer ones."""
    import random

    import google_crc32c

    from neox_train.remote.files import crc32c_combine

    def crc(data: bytes) -> int:
        return int.from_bytes(google_crc32c.Checksum(data).digest(), "big")

    rng = random.Random(0)
    short = bytes(rng.randrange(256) for _ in range(40))
    for k in range(len(short) + 1):
        assert crc32c_combine(crc(short[:k]), crc(short[k:]), len(short) - k) == crc(short), k
    for n in (1000, 65537, 1 << 20):
        data = rng.randbytes(n)
        k = rng.randrange(n + 1)
        assert crc32c_combine(crc(data[:k]), crc(data[k:]), n - k) == crc(data), (n, k)
