"""rsync semantics, checkpoint publication (parts, manifest, COMPLETE, latest) and fetch, on the real client against
the real emulator (through a fault-injecting proxy where it matters) and on a local folder; the two CLIs."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import pytest

import neox_train.storage as storage
from gcs import FaultProxy, direct_client, fast_retry, force_resumable, gcs_bucket, gcs_emulator  # noqa: F401
from neox_train.storage import Crc32cCache, LocalBackend, StorageError, crc32c_of_file, open_backend
from neox_train.sync import (COMPLETE, LATEST, MANIFEST, CheckpointConflict, fetch_checkpoint, finalize_checkpoint,
                             remote_checkpoints, remote_latest, sync, sync_down, sync_up, upload_checkpoint_part)
from neox_train.sync_cli import add_download_arguments, main as sync_main, main_download

TREE = {"a.bin": b"A" * 300, "sub/b.bin": b"B" * 20, "sub/deeper/c.json": b"{}", "sub/deeper/empty": b""}


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def touch_later(path: Path) -> None:
    """Make a rewrite visible to the mtime check even on a coarse-clock filesystem."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


@pytest.fixture(params=["gs", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "gs":
        bucket = request.getfixturevalue("gcs_bucket")
        return fast_retry(open_backend(f"gs://{bucket}/runs/r1"))
    return open_backend(str(tmp_path / "remote"))


class Recorder:
    """A backend wrapper that records writes and downloads, to check order and what was (not) transferred."""

    def __init__(self, inner):
        self.inner, self.writes, self.downloads = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_bytes(self, name, data, *, if_absent=False):
        self.writes.append(name)
        self.inner.write_bytes(name, data, if_absent=if_absent)

    def download_file(self, name, local):
        self.downloads.append(name)
        self.inner.download_file(name, local)


# ---------------------------------------------------------------------------------------------------------------
# rsync


def test_second_sync_uploads_nothing_and_reads_no_file(backend, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(tmp_path / "src", TREE)
    reads: list[Path] = []
    real = storage.crc32c_of_file
    monkeypatch.setattr(storage, "crc32c_of_file", lambda p: reads.append(Path(p)) or real(p))

    cache = Crc32cCache(tmp_path / "crc.json")
    first = sync_up(src, backend, "ckpt", cache=cache, workers=3)
    assert (first.files_uploaded, first.files_skipped, first.bytes_uploaded) == (4, 0, 322)
    # New files are hashed while they are sent: no separate read pass, yet the cache learns every crc32c.
    assert not [p for p in reads if src in p.parents], "a new file was read once to hash it and again to send it"
    cache.save()
    reads.clear()
    again = sync_up(src, backend, "ckpt", cache=Crc32cCache(tmp_path / "crc.json"))  # as a new process would
    assert (again.files_uploaded, again.files_skipped, again.bytes_uploaded) == (0, 4, 0)
    assert not [p for p in reads if src in p.parents], "an unchanged file was read again"


def test_changed_file_is_uploaded_again(backend, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    cache = Crc32cCache()
    sync_up(src, backend, "ckpt", cache=cache)
    (src / "sub" / "b.bin").write_bytes(b"C" * 20)  # same size: only the crc32c tells
    touch_later(src / "sub" / "b.bin")
    (src / "new.bin").write_bytes(b"new")
    result = sync_up(src, backend, "ckpt", cache=cache)
    assert (result.files_uploaded, result.files_skipped, result.bytes_uploaded) == (2, 3, 23)
    assert backend.read_bytes("ckpt/sub/b.bin") == b"C" * 20


def test_nested_folders_survive_the_round_trip(backend, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    sync_up(src, backend, "data/")
    assert set(backend.list("")) == {f"data/{rel}" for rel in TREE}

    out = tmp_path / "out"
    down = sync_down(backend, "data", out, workers=2)
    assert read_tree(out) == TREE
    assert (down.files_downloaded, down.bytes_downloaded, down.files_skipped) == (4, 322, 0)

    (out / "a.bin").write_bytes(b"short")  # wrong size: fetched again
    (out / "sub" / "b.bin").write_bytes(b"X" * 20)  # right size: kept (skip-existing compares sizes)
    again = sync_down(backend, "data", out)
    assert (again.files_downloaded, again.files_skipped) == (1, 3)
    assert (out / "a.bin").read_bytes() == TREE["a.bin"] and (out / "sub" / "b.bin").read_bytes() == b"X" * 20
    forced = sync_down(backend, "data", out, skip_existing=False)
    assert forced.files_downloaded == 4 and read_tree(out) == TREE


BAD_NAMES = ["/abs", "a\\b", "data//x", "data/./x", "../x", "a/../../b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_escaping_names_are_refused_before_any_download(gcs_bucket: str, gcs_emulator, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    for good in ("data/ok1", "data/sub/ok2"):
        bucket.blob(good).upload_from_string(b"fine")
    inject = []
    if ".." in bad.split("/"):
        # The emulator refuses to store '..' names (GCS does not): the proxy adds them to the real listing.
        inject = [{"kind": "storage#object", "name": bad, "bucket": gcs_bucket, "size": "3", "crc32c": "AAAAAA=="}]
    else:
        bucket.blob(bad).upload_from_string(b"bad")
    with FaultProxy(gcs_emulator.url, inject_list=inject) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        with pytest.raises(StorageError, match="refusing to download a name") as err:
            sync_down(fast_retry(open_backend(f"gs://{gcs_bucket}")), "", tmp_path / "out")
        assert not [t for _m, t, _a in proxy.log if t.startswith("/download/")]
    assert f"gs://{gcs_bucket}/{bad}:" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_local_backend_refuses_backslash_names_too(tmp_path: Path) -> None:
    make_tree(tmp_path / "remote", {"ok": b"1", "a\\b": b"2"})  # a legal file name on Linux
    with pytest.raises(StorageError, match=r"a\\b: refusing to download"):
        sync_down(LocalBackend(tmp_path / "remote"), "", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_placeholders_are_skipped(gcs_bucket: str, gcs_emulator, tmp_path: Path) -> None:
    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    bucket.blob("shards/").upload_from_string(b"")  # what the Cloud Console's "create folder" makes
    bucket.blob("shards/s0.npy").upload_from_string(b"tokens")
    result = sync_down(fast_retry(open_backend(f"gs://{gcs_bucket}")), "", tmp_path / "out")
    assert result.files_downloaded == 1 and read_tree(tmp_path / "out") == {"shards/s0.npy": b"tokens"}


def test_sync_directions_and_errors(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    assert sync(str(src), f"file://{tmp_path / 'dst'}").files_uploaded == 4
    assert read_tree(tmp_path / "dst") == TREE
    assert sync(str(src), str(tmp_path / "dst")).files_skipped == 4
    with pytest.raises(StorageError, match="both sides are gs:// URLs"):
        sync("gs://bkt-a/x", "gs://bkt-b/y")
    with pytest.raises(StorageError, match="no such folder"):
        sync(str(tmp_path / "missing"), str(tmp_path / "dst"))
    with pytest.raises(StorageError, match="inside"):
        sync(str(src), str(src / "sub" / "copy"))


def test_uploads_get_through_503s_resets_and_stalls(gcs_bucket: str, gcs_emulator, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"shard{i}.bin": os.urandom(1000 + i) for i in range(6)}
    files["big/resumable.bin"] = os.urandom(600 * 1024)  # 3 chunks of 256 KiB, each retried on its own
    src = make_tree(tmp_path / "src", files)
    rules = {"^POST /upload/": ["503", "reset", "stall", "lost", "pass", "503", "lost", "reset"],
             "^PUT /upload/": ["503", "pass", "reset", "stall", "pass", "stall", "503"]}  # resumable chunks
    with FaultProxy(gcs_emulator.url, rules=rules, stall_s=0.2) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}/ckpt"))
        force_resumable(monkeypatch, backend)
        result = sync_up(src, backend, "global_step1", workers=4)
    assert result.files_uploaded == 7 and result.retries >= 10
    assert sum(1 for m, _t, _a in proxy.log if m == "PUT") >= 3  # the resumable file went chunk by chunk
    assert all(proxy.counts[a] >= 2 for a in ("503", "reset", "stall", "lost"))
    stored = {b.name: b.crc32c for b in direct_client(gcs_emulator.url).list_blobs(gcs_bucket)}
    assert stored == {f"ckpt/global_step1/{rel}": crc32c_of_file(src / rel) for rel in files}


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(save_dir: Path, tag: str, files: dict[str, bytes] | None = None) -> Path:
    files = files if files is not None else {"mp_rank_00_model_states.pt": tag.encode() * 10,
                                             "zero/optim_states.pt": b"o" * 50}
    return make_tree(save_dir / tag, files)


def publish(save_dir: Path, tag: str, backend, **kw) -> bool:
    upload_checkpoint_part(save_dir, tag, backend, **kw)
    return finalize_checkpoint(backend, tag)


def test_publication_order_and_latest_only_moves_forward(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    rec = Recorder(backend)
    save_checkpoint(save, "global_step10")
    assert publish(save, "global_step10", rec)
    assert rec.writes == ["global_step10/.parts/node-0.json", f"global_step10/{MANIFEST}",
                          f"global_step10/{COMPLETE}", LATEST]
    manifest = json.loads(backend.read_bytes(f"global_step10/{MANIFEST}"))
    assert manifest["step"] == 10 and manifest["num_nodes"] == 1
    optim = save / "global_step10" / "zero" / "optim_states.pt"
    assert manifest["files"]["zero/optim_states.pt"] == {"size": 50, "crc32c": crc32c_of_file(optim)}

    save_checkpoint(save, "global_step9")  # an older step published later (e.g. a retried backlog)
    rec.writes.clear()
    assert publish(save, "global_step9", rec)
    assert LATEST not in rec.writes and backend.read_bytes(LATEST) == b"global_step10"
    assert remote_checkpoints(backend) == ["global_step9", "global_step10"]  # by step, not by string
    assert remote_latest(backend) == "global_step10"

    rec.writes.clear()
    assert finalize_checkpoint(rec, "global_step10") and rec.writes == []  # idempotent


def test_two_nodes_publish_once_both_parts_are_there(backend, tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    save_checkpoint(node0, "global_step4", {"mp_rank_00_model_states.pt": b"m", "zero_pp_rank_0_optim_states.pt": b"0"})
    # Under use_node_local_storage node 1 writes its own copy of the model states too (same weights, other bytes):
    # the checkpoint takes node 0's.
    save_checkpoint(node1, "global_step4", {"mp_rank_00_model_states.pt": b"m-node1", "zero_pp_rank_1_optim_states.pt": b"11"})
    upload_checkpoint_part(node0, "global_step4", backend, node_rank=0)
    assert finalize_checkpoint(backend, "global_step4", num_nodes=2) is False
    assert backend.read_bytes(f"global_step4/{MANIFEST}") is None
    assert backend.read_bytes(f"global_step4/{COMPLETE}") is None
    upload_checkpoint_part(node1, "global_step4", backend, node_rank=1)
    assert finalize_checkpoint(backend, "global_step4", num_nodes=2) is True
    manifest = json.loads(backend.read_bytes(f"global_step4/{MANIFEST}"))
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_optim_states.pt",
                                         "zero_pp_rank_1_optim_states.pt"]
    assert manifest["num_nodes"] == 2
    assert backend.read_bytes("global_step4/mp_rank_00_model_states.pt") == b"m"


def test_a_stale_part_from_an_earlier_run_is_not_merged(backend, tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    save_checkpoint(node0, "global_step4", {"a": b"0"})
    save_checkpoint(node1, "global_step4", {"b": b"1"})
    upload_checkpoint_part(node1, "global_step4", backend, node_rank=1, run_id="crashed-run")
    upload_checkpoint_part(node0, "global_step4", backend, node_rank=0, run_id="this-run")
    assert finalize_checkpoint(backend, "global_step4", num_nodes=2) is False
    upload_checkpoint_part(node1, "global_step4", backend, node_rank=1, run_id="this-run")
    assert finalize_checkpoint(backend, "global_step4", num_nodes=2) is True


def test_finalize_refuses_a_part_whose_file_is_not_remote(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step2")
    upload_checkpoint_part(save, "global_step2", backend)
    backend.delete("global_step2/zero/optim_states.pt")
    with pytest.raises(StorageError, match=r"cannot finalize .*/global_step2: zero/optim_states.pt is missing"):
        finalize_checkpoint(backend, "global_step2")
    assert backend.read_bytes(f"global_step2/{COMPLETE}") is None and backend.read_bytes(LATEST) is None


def test_reserved_names_and_published_tags_are_never_overwritten(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step1", {"manifest.json": b"{}"})
    with pytest.raises(StorageError, match="'manifest.json' is a name reserved"):
        upload_checkpoint_part(save, "global_step1", backend)

    save_checkpoint(save, "global_step2")
    assert publish(save, "global_step2", backend)
    assert upload_checkpoint_part(save, "global_step2", backend).files_skipped == 2  # same content: a no-op
    (save / "global_step2" / "zero" / "optim_states.pt").write_bytes(b"retrained")
    with pytest.raises(CheckpointConflict, match=r"already published \(COMPLETE\) with different content"):
        upload_checkpoint_part(save, "global_step2", backend)
    assert backend.read_bytes("global_step2/zero/optim_states.pt") == b"o" * 50


def test_fetch_installs_a_verified_copy_and_reuses_matching_files(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step6")
    assert publish(save, "global_step6", backend)
    assert remote_latest(backend) == "global_step6"

    dest = tmp_path / "resume"
    rec = Recorder(backend)
    path = fetch_checkpoint(rec, "global_step6", dest, workers=2)
    assert path == dest / "global_step6" and read_tree(path) == read_tree(save / "global_step6")
    assert (dest / "latest").read_text() == "global_step6"
    assert sorted(p.name for p in dest.iterdir()) == ["global_step6", "latest"]  # no partial folder left
    assert len(rec.downloads) == 2

    rec.downloads.clear()
    fetch_checkpoint(rec, "global_step6", dest)
    assert rec.downloads == []
    (path / "zero" / "optim_states.pt").write_bytes(b"damaged")
    fetch_checkpoint(rec, "global_step6", dest)
    assert rec.downloads == ["global_step6/zero/optim_states.pt"]
    assert read_tree(path) == read_tree(save / "global_step6")


def test_fetch_refuses_a_checkpoint_changed_after_complete(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step3")
    assert publish(save, "global_step3", backend)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"X" * 50)
    backend.upload_file(evil, "global_step3/zero/optim_states.pt", crc32c=crc32c_of_file(evil), if_absent=False)
    with pytest.raises(StorageError, match=r"global_step3/zero/optim_states.pt is size 50 crc32c .* the manifest says"):
        fetch_checkpoint(backend, "global_step3", tmp_path / "resume")
    assert not (tmp_path / "resume").exists()  # refused on the listing, before a byte was downloaded


def test_fetch_verifies_the_downloaded_bytes(tmp_path: Path) -> None:
    """Corruption between bucket and disk (the listing still looks right) is caught and nothing is installed."""
    save = tmp_path / "save"
    save_checkpoint(save, "global_step3")
    backend = LocalBackend(tmp_path / "remote")
    assert publish(save, "global_step3", backend)

    class Flaky(Recorder):
        def download_file(self, name, local):
            super().download_file(name, local)
            if name.endswith("optim_states.pt"):
                Path(local).write_bytes(b"flipped bits" + b"o" * 38)

    with pytest.raises(StorageError, match=r"global_step3/zero/optim_states.pt downloaded with size 50 crc32c"):
        fetch_checkpoint(Flaky(backend), "global_step3", tmp_path / "resume")
    assert list((tmp_path / "resume").iterdir()) == []


def test_fetch_refuses_incomplete_tags(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step1")
    assert publish(save, "global_step1", backend)
    save_checkpoint(save, "global_step2")
    upload_checkpoint_part(save, "global_step2", backend)  # uploaded, never finalized
    with pytest.raises(StorageError, match=r"global_step2 is not a complete checkpoint .*complete ones: global_step1"):
        fetch_checkpoint(backend, "global_step2", tmp_path / "resume")
    assert not (tmp_path / "resume" / "global_step2").exists()
    assert remote_checkpoints(backend) == ["global_step1"]
    backend.write_bytes(LATEST, b"global_step2")  # a pointer at an incomplete tag is not trusted
    assert remote_latest(backend) == "global_step1"


def test_complete_always_means_every_file_is_there(gcs_bucket: str, gcs_emulator, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish through a faulty proxy in a thread while polling the emulator directly: whenever COMPLETE exists,
    every manifest file exists with its crc32c, and `latest` only ever names a COMPLETE tag."""
    save = tmp_path / "save"
    tags = ["global_step1", "global_step2"]
    for tag in tags:
        files = {f"shard{i}.pt": os.urandom(2000) for i in range(5)}
        save_checkpoint(save, tag, files | {"big.pt": os.urandom(600 * 1024)})  # big.pt: resumable, 3 chunks
    direct = direct_client(gcs_emulator.url)
    rules = {"^POST /upload/": ["503", "reset", "stall", "lost", "pass"] * 4,
             "^PUT /upload/": ["503", "reset", "stall", "pass"] * 2}
    with FaultProxy(gcs_emulator.url, rules=rules, stall_s=0.05) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}/ckpt"))
        force_resumable(monkeypatch, backend)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for tag in tags:
                    assert publish(save, tag, backend, workers=3)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        publisher = threading.Thread(target=run)
        publisher.start()
        seen_incomplete = seen_complete = 0
        while publisher.is_alive() or not seen_complete:
            listing = {b.name: b.crc32c for b in direct.list_blobs(gcs_bucket, prefix="ckpt/")}
            for tag in tags:
                if f"ckpt/{tag}/{COMPLETE}" not in listing:
                    seen_incomplete += any(n.startswith(f"ckpt/{tag}/") for n in listing)
                    continue
                seen_complete += 1
                manifest = json.loads(direct.bucket(gcs_bucket).blob(f"ckpt/{tag}/{MANIFEST}").download_as_bytes())
                for rel, meta in manifest["files"].items():
                    assert listing.get(f"ckpt/{tag}/{rel}") == meta["crc32c"], f"{tag}/{rel} not as in the manifest"
            latest = direct.bucket(gcs_bucket).get_blob("ckpt/latest")
            if latest is not None:  # read after the listing, so it may name a tag completed since: ask again
                assert direct.bucket(gcs_bucket).get_blob(f"ckpt/{latest.download_as_bytes().decode()}/{COMPLETE}")
            if not publisher.is_alive() and errors:
                break
            time.sleep(0.005)
        publisher.join()
    assert not errors, errors
    assert seen_incomplete > 0 and seen_complete > 0
    assert all(proxy.counts[a] >= 2 for a in ("503", "reset", "stall", "lost"))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    assert remote_latest(open_backend(f"gs://{gcs_bucket}/ckpt")) == "global_step2"


# ---------------------------------------------------------------------------------------------------------------
# command lines


def _service_account_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "neox-test", "private_key_id": "k1", "private_key": pem,
        "client_email": "trainer@neox-test.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }))
    return path


def test_neox_sync_json_both_directions(gcs_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_tree(tmp_path / "src", TREE)
    key = _service_account_key(tmp_path / "key.json")
    url = f"gs://{gcs_bucket}/mirror"
    assert sync_main([str(src), url, "--json", "--workers", "2", "--credentials", str(key)]) == 0
    out, err = capsys.readouterr()
    up = json.loads(out)
    assert (up["files_uploaded"], up["bytes_uploaded"], up["files_skipped"]) == (4, 322, 0)
    assert {"files_downloaded", "bytes_downloaded", "seconds"} <= set(up)
    assert "neox-sync: 4 uploaded" in err

    assert sync_main([url, str(tmp_path / "back"), "--json"]) == 0
    down = json.loads(capsys.readouterr().out)
    assert (down["files_downloaded"], down["bytes_downloaded"]) == (4, 322) and read_tree(tmp_path / "back") == TREE

    assert sync_main([str(src), "gs://Not_A_Bucket/x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("neox-sync: error: gs://Not_A_Bucket/x: 'Not_A_Bucket' is not a valid bucket")
    assert err.count("\n") == 1


def test_neox_sync_checkpoints_publishes_a_save_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save = tmp_path / "save"
    for tag in ("global_step5", "global_step10"):
        save_checkpoint(save, tag)
    (save / "latest").write_text("global_step10")
    assert sync_main([str(save), str(tmp_path / "remote"), "--checkpoints", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files_uploaded"] == 4
    backend = open_backend(str(tmp_path / "remote"))
    assert remote_checkpoints(backend) == ["global_step5", "global_step10"]
    assert backend.read_bytes(LATEST) == b"global_step10"


def test_neox_data_download_skips_existing(backend, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sync_up(make_tree(tmp_path / "shards", TREE), backend, "")
    parser = argparse.ArgumentParser(prog="neox-data download")
    add_download_arguments(parser)
    dest = tmp_path / "data"
    make_tree(dest, {"a.bin": b"L" * 300})  # already there with the remote size: kept
    assert main_download(parser.parse_args([backend.url, str(dest), "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["files_downloaded"], result["files_skipped"]) == (3, 1)
    assert read_tree(dest) == TREE | {"a.bin": b"L" * 300}

    assert main_download(parser.parse_args([f"file://{tmp_path / 'nothing'}", str(dest)])) == 2
    err = capsys.readouterr().err
    assert err == f"neox-data: error: nothing to download: no objects under file://{tmp_path}/nothing (check the URL)\n"
