"""rsync semantics, checkpoint publication (parts, manifest, COMPLETE, latest) and fetch, on the
real client against the real emulator (through a fault-injecting proxy where it matters) and on a
local folder; the two CLIs."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import pytest

import neox_train.remote.files as storage
from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.commit import LATEST
from neox_train.checkpoint.publish.copy_rules import protect_published
from neox_train.checkpoint.publish.fetch import fetch_checkpoint, remote_checkpoints, remote_latest
from neox_train.checkpoint.publish.owner import Identity, PrefixOwned, claim
from neox_train.checkpoint.publish.protocol import (
    COMPLETE,
    MANIFEST,
    CheckpointConflict,
    CheckpointIncomplete,
    finalize_checkpoint,
    upload_checkpoint_part,
)
from neox_train.cli.sync import add_download_arguments, main_download
from neox_train.cli.sync import main as sync_main
from neox_train.errors import StorageError
from neox_train.remote import open_backend
from neox_train.remote.files import Crc32cCache, crc32c_of_file
from neox_train.remote.local import LocalBackend
from neox_train.remote.rsync import sync, sync_down, sync_up

from gcs import (  # noqa: F401
    FaultProxy,
    backend,
    direct_client,
    fast_retry,
    force_resumable,
    gcs_bucket,
    gcs_emulator,
    strict_backend,
)

TREE = {"a.bin": b"A" * 300, "sub/b.bin": b"B" * 20, "sub/deeper/c.json": b"{}",
        "sub/deeper/empty": b""}


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def touch_later(path: Path) -> None:
    """Make a rewrite visible to the mtime check even on a coarse-clock filesystem."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


class Recorder:
    """A backend wrapper that records writes and downloads, to check order and what was (not)
    transferred."""

    def __init__(self, inner):
        self.inner, self.writes, self.downloads = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_bytes(self, name, data, *, generation):
        self.writes.append(name)
        return self.inner.write_bytes(name, data, generation=generation)

    def download_file(self, name, local, *, size=None):
        self.downloads.append(name)
        return self.inner.download_file(name, local, size=size)


# --------------------------------------------------------------------------------------------------
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
    # New files are hashed while they are sent: no separate read pass, yet the cache learns every
    # crc32c.
    assert not [p for p in reads if src in p.parents], \
        "a new file was read once to hash it and again to send it"
    cache.save()
    reads.clear()
    # as a new process would
    again = sync_up(src, backend, "ckpt", cache=Crc32cCache(tmp_path / "crc.json"))
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
    # right size: kept (skip-existing compares sizes)
    (out / "sub" / "b.bin").write_bytes(b"X" * 20)
    again = sync_down(backend, "data", out)
    assert (again.files_downloaded, again.files_skipped) == (1, 3)
    assert ((out / "a.bin").read_bytes() == TREE["a.bin"]
            and (out / "sub" / "b.bin").read_bytes() == b"X" * 20)
    forced = sync_down(backend, "data", out, skip_existing=False)
    assert forced.files_downloaded == 4 and read_tree(out) == TREE


BAD_NAMES = ["/abs", "a\\b", "data//x", "data/./x", "../x", "a/../../b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_escaping_names_are_refused_before_any_download(gcs_bucket: str, gcs_emulator,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        bad: str) -> None:
    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    for good in ("data/ok1", "data/sub/ok2"):
        bucket.blob(good).upload_from_string(b"fine")
    inject = []
    if ".." in bad.split("/"):
        # The emulator refuses to store '..' names (GCS does not): the proxy adds them to the real
        # listing.
        inject = [{"kind": "storage#object", "name": bad, "bucket": gcs_bucket, "size": "3",
                   "crc32c": "AAAAAA=="}]
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
    assert (result.files_downloaded == 1
            and read_tree(tmp_path / "out") == {"shards/s0.npy": b"tokens"})


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
    # 3 chunks of 256 KiB, each retried on its own
    files["big/resumable.bin"] = os.urandom(600 * 1024)
    src = make_tree(tmp_path / "src", files)
    rules = {"^POST /upload/": ["503", "reset", "stall", "lost", "pass", "503", "lost", "reset"],
             # resumable chunks
             "^PUT /upload/": ["503", "pass", "reset", "stall", "pass", "stall", "503"]}
    with FaultProxy(gcs_emulator.url, rules=rules, stall_s=0.2) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        backend = fast_retry(open_backend(f"gs://{gcs_bucket}/ckpt"))
        force_resumable(monkeypatch, backend)
        result = sync_up(src, backend, "global_step1", workers=4)
    assert result.files_uploaded == 7 and result.retries >= 10
    # the resumable file went chunk by chunk
    assert sum(1 for m, _t, _a in proxy.log if m == "PUT") >= 3
    assert all(proxy.counts[a] >= 2 for a in ("503", "reset", "stall", "lost"))
    stored = {b.name: b.crc32c for b in direct_client(gcs_emulator.url).list_blobs(gcs_bucket)}
    assert stored == {f"ckpt/global_step1/{rel}": crc32c_of_file(src / rel) for rel in files}


# --------------------------------------------------------------------------------------------------
# checkpoints


RUN = Identity("0123456789ab", "000000000001")
OTHER_RUN = Identity("ba9876543210", "000000000002")


def save_checkpoint(save_dir: Path, tag: str, files: dict[str, bytes] | None = None, *,
                    run_id: str | None = RUN.run_id, committed: bool = True) -> Path:
    """A tag folder as a training run leaves it: its files, then (committed) the completeness marker
    and `latest`."""
    files = files if files is not None else {"mp_rank_00_model_states.pt": tag.encode() * 10,
                                             "zero/optim_states.pt": b"o" * 50}
    folder = make_tree(save_dir / tag, files)
    if committed:
        commit.commit(save_dir, tag, run_id=run_id)
    return folder


def recommit(save_dir: Path, tag: str, run_id: str | None = RUN.run_id) -> None:
    """After a test changed a tag's files: commit again (as a new save of that step would)."""
    (save_dir / tag / commit.MARKER).unlink()
    commit.commit(save_dir, tag, run_id=run_id)


def publish(save_dir: Path, tag: str, backend, identity: Identity = RUN, **kw) -> bool:
    claim(backend, identity, takeover=True, save_dir=str(save_dir))
    upload_checkpoint_part(save_dir, tag, backend, identity=identity, **kw)
    return finalize_checkpoint(backend, tag, identity=identity)


def test_publication_order_and_latest_only_moves_forward(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    rec = Recorder(backend)
    save_checkpoint(save, "global_step10")
    claim(backend, RUN, takeover=False, save_dir=str(save))
    upload_checkpoint_part(save, "global_step10", rec, identity=RUN)
    assert finalize_checkpoint(rec, "global_step10", identity=RUN)
    assert rec.writes == ["global_step10/.parts/node-0.json", f"global_step10/{MANIFEST}",
                          f"global_step10/{COMPLETE}", LATEST]
    manifest = json.loads(backend.read_bytes(f"global_step10/{MANIFEST}"))
    assert (manifest["step"] == 10 and manifest["num_nodes"] == 1
            and manifest["run_id"] == RUN.run_id)
    assert json.loads(backend.read_bytes(f"global_step10/{COMPLETE}"))["run_id"] == RUN.run_id
    optim = save / "global_step10" / "zero" / "optim_states.pt"
    assert manifest["files"]["zero/optim_states.pt"] == {"size": 50,
                                                         "crc32c": crc32c_of_file(optim)}
    assert (commit.MARKER not in manifest["files"]
            and not backend.list(f"global_step10/{commit.MARKER}"))

    save_checkpoint(save, "global_step9")  # an older step published later (e.g. a retried backlog)
    rec.writes.clear()
    assert publish(save, "global_step9", rec)
    assert LATEST not in rec.writes and backend.read_bytes(LATEST) == b"global_step10"
    # by step, not by string
    assert remote_checkpoints(backend) == ["global_step9", "global_step10"]
    assert remote_latest(backend) == "global_step10"

    rec.writes.clear()
    # idempotent
    assert finalize_checkpoint(rec, "global_step10", identity=RUN) and rec.writes == []


def test_two_nodes_publish_once_both_parts_are_there(backend, tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    save_checkpoint(node0, "global_step4", {"mp_rank_00_model_states.pt": b"m",
                                            "zero_pp_rank_0_optim_states.pt": b"0",
                                            "run.json": b"{}"})
    # Under use_node_local_storage node 1 writes its own copy of the model states and side files too
    # (same weights, other bytes): the checkpoint takes node 0's.
    save_checkpoint(node1, "global_step4", {"mp_rank_00_model_states.pt": b"m-node1",
                                            "zero_pp_rank_1_optim_states.pt": b"11",
                                            "run.json": b'{"x": 1}'})
    claim(backend, RUN, takeover=False, save_dir=str(node0))
    upload_checkpoint_part(node0, "global_step4", backend, identity=RUN, node_rank=0)
    assert finalize_checkpoint(backend, "global_step4", identity=RUN, num_nodes=2) is False
    assert backend.read_bytes(f"global_step4/{MANIFEST}") is None
    assert backend.read_bytes(f"global_step4/{COMPLETE}") is None
    upload_checkpoint_part(node1, "global_step4", backend, identity=RUN, node_rank=1)
    assert finalize_checkpoint(backend, "global_step4", identity=RUN, num_nodes=2) is True
    manifest = json.loads(backend.read_bytes(f"global_step4/{MANIFEST}"))
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "run.json",
                                         "zero_pp_rank_0_optim_states.pt",
                                         "zero_pp_rank_1_optim_states.pt"]
    assert manifest["num_nodes"] == 2
    assert backend.read_bytes("global_step4/mp_rank_00_model_states.pt") == b"m"
    assert backend.read_bytes("global_step4/run.json") == b"{}"


def test_a_part_from_an_earlier_start_waits_and_another_runs_part_is_refused(
        backend, tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    save_checkpoint(node0, "global_step4", {"a": b"0"})
    save_checkpoint(node1, "global_step4", {"b": b"1"})
    crashed = Identity(RUN.run_id, "00000000dead")  # the same run before a restart
    claim(backend, crashed, takeover=False, save_dir=str(node0))
    upload_checkpoint_part(node1, "global_step4", backend, identity=crashed, node_rank=1)
    claim(backend, RUN, takeover=False, save_dir=str(node0))  # the restart takes the session over
    upload_checkpoint_part(node0, "global_step4", backend, identity=RUN, node_rank=0)
    assert finalize_checkpoint(backend, "global_step4", identity=RUN, num_nodes=2) is False
    # replaces its old part
    upload_checkpoint_part(node1, "global_step4", backend, identity=RUN, node_rank=1)
    assert finalize_checkpoint(backend, "global_step4", identity=RUN, num_nodes=2) is True

    save_checkpoint(node0, "global_step6", {"a": b"6"})
    upload_checkpoint_part(node0, "global_step6", backend, identity=RUN)
    with pytest.raises(CheckpointConflict, match=f"being published by run {RUN.run_id}"):
        upload_checkpoint_part(node0, "global_step6", backend, identity=OTHER_RUN)


def test_finalize_refuses_a_part_whose_file_is_not_remote(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step2")
    claim(backend, RUN, takeover=False, save_dir=str(save))
    upload_checkpoint_part(save, "global_step2", backend, identity=RUN)
    backend.delete("global_step2/zero/optim_states.pt", generation=None)
    with pytest.raises(StorageError,
                       match=r"cannot finalize .*/global_step2: zero/optim_states.pt is missing"):
        finalize_checkpoint(backend, "global_step2", identity=RUN)
    assert (backend.read_bytes(f"global_step2/{COMPLETE}") is None
            and backend.read_bytes(LATEST) is None)


def test_reserved_names_and_published_tags_are_never_overwritten(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step1", {"manifest.json": b"{}"})
    with pytest.raises(StorageError, match="'manifest.json' is a name reserved"):
        upload_checkpoint_part(save, "global_step1", backend, identity=RUN)

    save_checkpoint(save, "global_step2")
    assert publish(save, "global_step2", backend)
    # a no-op
    assert upload_checkpoint_part(save, "global_step2", backend, identity=RUN).files_skipped == 2
    (save / "global_step2" / "zero" / "optim_states.pt").write_bytes(b"retrained")
    recommit(save, "global_step2")
    with pytest.raises(CheckpointConflict, match=r"already published \(COMPLETE\) with different "
                                                 r"content") as err:
        upload_checkpoint_part(save, "global_step2", backend, identity=RUN)
    assert not err.value.transient
    assert backend.read_bytes("global_step2/zero/optim_states.pt") == b"o" * 50


def test_only_complete_local_tags_are_published(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    # DeepSpeed's files, the commit never happened
    save_checkpoint(save, "global_step3", committed=False)
    with pytest.raises(CheckpointIncomplete, match="no completeness marker"):
        upload_checkpoint_part(save, "global_step3", backend, identity=RUN)
    save_checkpoint(save, "global_step4")
    # not what was committed
    (save / "global_step4" / "zero" / "optim_states.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointIncomplete, match="optim_states.pt has 4 bytes"):
        upload_checkpoint_part(save, "global_step4", backend, identity=RUN)
    assert backend.list("") == {}


def test_a_second_publisher_never_replaces_files_of_a_published_tag(
        strict_backend, tmp_path: Path) -> None:
    """Defect: the uploader looked at COMPLETE once, before sending; a second writer (a double
    launch) replaced a file after the first had published, and the COMPLETE tag no longer matched
    its manifest. Now every write is conditional and a replacement re-checks ownership and COMPLETE
    right before it."""
    backend, _proxy = strict_backend
    first, second = tmp_path / "first", tmp_path / "second"
    files = lambda b: {"mp_rank_00_model_states.pt": b * 10, "zero/optim_states.pt": b * 50}  # noqa: E731
    save_checkpoint(first, "global_step4", files(b"A"))
    save_checkpoint(second, "global_step4", files(b"B"))  # same names and sizes, other bytes
    older = Identity(RUN.run_id, "0000000000aa")  # the launch that lost the session
    claim(backend, older, takeover=False, save_dir=str(second))
    claim(backend, RUN, takeover=False, save_dir=str(first))
    upload_checkpoint_part(first, "global_step4", backend, identity=RUN)

    class PublishesMeanwhile(Recorder):
        """The first publisher completes the tag right after the second one listed it."""
        fired = False

        def list(self, prefix=""):
            listing = self.inner.list(prefix)
            if not self.fired and prefix == "global_step4/":
                PublishesMeanwhile.fired = True
                assert finalize_checkpoint(self.inner, "global_step4", identity=RUN)
            return listing

    with pytest.raises((CheckpointConflict, PrefixOwned)):
        upload_checkpoint_part(second, "global_step4", PublishesMeanwhile(backend), identity=older)
    # every file still matches the manifest
    fetch_checkpoint(backend, "global_step4", tmp_path / "check")
    assert read_tree(tmp_path / "check" / "global_step4") == read_tree(first / "global_step4") | {
        commit.MARKER: (tmp_path / "check" / "global_step4" / commit.MARKER).read_bytes()}


def test_finalize_fences_on_the_owner_right_before_publishing(backend, tmp_path: Path) -> None:
    """A takeover (or a newer start of the same run) between a part's upload and its finalize: the
    older publisher writes neither manifest nor COMPLETE, and says who owns the prefix now."""
    save = tmp_path / "save"
    save_checkpoint(save, "global_step8")
    claim(backend, RUN, takeover=False, save_dir=str(save))
    upload_checkpoint_part(save, "global_step8", backend, identity=RUN)
    newer = Identity(RUN.run_id, "00000000beef")
    # the same run, started again elsewhere
    claim(backend, newer, takeover=False, save_dir=str(save))
    with pytest.raises(PrefixOwned, match="a newer start of this run") as err:
        finalize_checkpoint(backend, "global_step8", identity=RUN)
    assert not err.value.transient
    claim(backend, OTHER_RUN, takeover=True, save_dir=str(save))
    with pytest.raises(PrefixOwned, match=f"belongs to run {OTHER_RUN.run_id}"):
        finalize_checkpoint(backend, "global_step8", identity=RUN)
    assert backend.read_bytes(f"global_step8/{MANIFEST}") is None
    assert (backend.read_bytes(f"global_step8/{COMPLETE}") is None
            and backend.read_bytes(LATEST) is None)


def test_fetch_installs_a_verified_copy_and_reuses_matching_files(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step6")
    assert publish(save, "global_step6", backend)
    assert remote_latest(backend) == "global_step6"

    dest = tmp_path / "resume"
    rec = Recorder(backend)
    path = fetch_checkpoint(rec, "global_step6", dest, workers=2)
    assert path == dest / "global_step6"
    assert read_tree(path) == read_tree(save / "global_step6") | {
        commit.MARKER: (path / commit.MARKER).read_bytes()}
    status = commit.inspect(dest, "global_step6")
    assert status.complete and status.run_id == RUN.run_id and commit.verify(dest, status) == ""
    assert (dest / "latest").read_text() == "global_step6"
    # no partial folder left
    assert sorted(p.name for p in dest.iterdir()) == ["global_step6", "latest"]
    assert len(rec.downloads) == 2

    rec.downloads.clear()
    fetch_checkpoint(rec, "global_step6", dest)
    assert rec.downloads == []
    (path / "zero" / "optim_states.pt").write_bytes(b"damaged")
    fetch_checkpoint(rec, "global_step6", dest)
    assert rec.downloads == ["global_step6/zero/optim_states.pt"]
    assert read_tree(path) == read_tree(save / "global_step6") | {
        commit.MARKER: (path / commit.MARKER).read_bytes()}


def test_fetch_refuses_a_checkpoint_changed_after_complete(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step3")
    assert publish(save, "global_step3", backend)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"X" * 50)
    backend.upload_file(evil, "global_step3/zero/optim_states.pt", crc32c=crc32c_of_file(evil),
                        generation=None)
    with pytest.raises(StorageError, match=r"global_step3/zero/optim_states.pt is size 50 crc32c "
                                           r".* the manifest says"):
        fetch_checkpoint(backend, "global_step3", tmp_path / "resume")
    # refused on the listing, before a byte was downloaded
    assert not (tmp_path / "resume").exists()


def test_fetch_verifies_the_downloaded_bytes(tmp_path: Path) -> None:
    """Corruption between bucket and disk (the listing still looks right) is caught and nothing is
    installed."""
    save = tmp_path / "save"
    save_checkpoint(save, "global_step3")
    backend = LocalBackend(tmp_path / "remote")
    assert publish(save, "global_step3", backend)

    class Flaky(Recorder):
        def download_file(self, name, local, *, size=None):
            crc = super().download_file(name, local, size=size)
            if name.endswith("optim_states.pt"):  # other bytes arrived (and were hashed)
                Path(local).write_bytes(b"flipped bits" + b"o" * 38)
                crc = crc32c_of_file(Path(local))
            return crc

    with pytest.raises(StorageError,
                       match=r"global_step3/zero/optim_states.pt downloaded with size 50 crc32c"):
        fetch_checkpoint(Flaky(backend), "global_step3", tmp_path / "resume")
    assert list((tmp_path / "resume").iterdir()) == []


def test_a_fetch_checks_the_bytes_as_they_arrived_and_reads_no_file_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume download is checked against the manifest with the crc32c taken as its bytes arrived
    (issue 22: it used to fsync and read every file back for a second crc32c)."""
    import neox_train.checkpoint.publish.fetch as fetch_module

    save = tmp_path / "save"
    save_checkpoint(save, "global_step3")
    backend = LocalBackend(tmp_path / "remote")
    assert publish(save, "global_step3", backend)
    reads: list[Path] = []
    for module in (storage, fetch_module):
        real = module.crc32c_of_file
        monkeypatch.setattr(module, "crc32c_of_file",
                            lambda p, real=real: reads.append(Path(p)) or real(p))
    installed = fetch_checkpoint(backend, "global_step3", tmp_path / "resume")
    assert reads == [] and commit.verify(tmp_path / "resume", commit.inspect(
        tmp_path / "resume", "global_step3")) == ""
    assert installed == tmp_path / "resume" / "global_step3"

    class Misreported(Recorder):
        """Intact files, but the bytes that arrived hashed to something else: refused."""

        def download_file(self, name, local, *, size=None):
            super().download_file(name, local, size=size)
            return "AAAAAA=="

    with pytest.raises(StorageError, match=r"downloaded with size \d+ crc32c AAAAAA=="):
        fetch_checkpoint(Misreported(backend), "global_step3", tmp_path / "again")


def test_fetch_refuses_incomplete_tags(backend, tmp_path: Path) -> None:
    save = tmp_path / "save"
    save_checkpoint(save, "global_step1")
    assert publish(save, "global_step1", backend)
    save_checkpoint(save, "global_step2")
    upload_checkpoint_part(save, "global_step2", backend, identity=RUN)  # uploaded, never finalized
    with pytest.raises(StorageError, match=r"global_step2 is not a complete checkpoint .*complete "
                                           r"ones: global_step1"):
        fetch_checkpoint(backend, "global_step2", tmp_path / "resume")
    assert not (tmp_path / "resume" / "global_step2").exists()
    assert remote_checkpoints(backend) == ["global_step1"]
    # a pointer at an incomplete tag is not trusted
    backend.write_bytes(LATEST, b"global_step2", generation=None)
    assert remote_latest(backend) == "global_step1"


def test_complete_always_means_every_file_is_there(gcs_bucket: str, gcs_emulator, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish through a faulty proxy in a thread while polling the emulator directly: whenever
    COMPLETE exists, every manifest file exists with its crc32c, and `latest` only ever names a
    COMPLETE tag."""
    save = tmp_path / "save"
    tags = ["global_step1", "global_step2"]
    for tag in tags:
        files = {f"shard{i}.pt": os.urandom(2000) for i in range(5)}
        # big.pt: resumable, 3 chunks
        save_checkpoint(save, tag, files | {"big.pt": os.urandom(600 * 1024)})
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
                manifest = json.loads(
                    direct.bucket(gcs_bucket).blob(f"ckpt/{tag}/{MANIFEST}").download_as_bytes())
                for rel, meta in manifest["files"].items():
                    assert listing.get(f"ckpt/{tag}/{rel}") == meta["crc32c"], \
                        f"{tag}/{rel} not as in the manifest"
            latest = direct.bucket(gcs_bucket).get_blob("ckpt/latest")
            # read after the listing, so it may name a tag completed since: ask again
            if latest is not None:
                assert direct.bucket(gcs_bucket).get_blob(
                    f"ckpt/{latest.download_as_bytes().decode()}/{COMPLETE}")
            if not publisher.is_alive() and errors:
                break
            time.sleep(0.005)
        publisher.join()
    assert not errors, errors
    assert seen_incomplete > 0 and seen_complete > 0
    assert all(proxy.counts[a] >= 2 for a in ("503", "reset", "stall", "lost"))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    assert remote_latest(open_backend(f"gs://{gcs_bucket}/ckpt")) == "global_step2"


# --------------------------------------------------------------------------------------------------
# command lines


def _service_account_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "neox-test", "private_key_id": "k1",
        "private_key": pem, "client_email": "trainer@neox-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token",
    }))
    return path


def test_neox_sync_json_both_directions(gcs_bucket: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
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
    assert ((down["files_downloaded"], down["bytes_downloaded"]) == (4, 322)
            and read_tree(tmp_path / "back") == TREE)

    assert sync_main([str(src), "gs://Not_A_Bucket/x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(
        "neox-sync: error: gs://Not_A_Bucket/x: 'Not_A_Bucket' is not a valid bucket")
    assert err.count("\n") == 1


def test_neox_sync_checkpoints_publishes_a_save_dir(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    save = tmp_path / "save"
    for tag in ("global_step5", "global_step10"):
        save_checkpoint(save, tag)
    assert sync_main([str(save), str(tmp_path / "remote"), "--checkpoints", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files_uploaded"] == 4 and out["published"] == ["global_step5", "global_step10"]
    backend = open_backend(str(tmp_path / "remote"))
    assert remote_checkpoints(backend) == ["global_step5", "global_step10"]
    assert backend.read_bytes(LATEST) == b"global_step10"
    assert json.loads(backend.read_bytes(".neox-owner.json"))["run_id"] == RUN.run_id


def test_neox_sync_checkpoints_never_publishes_a_half_written_tag(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Defect: the crash-recovery command published every global_step* folder, torn ones included,
    as COMPLETE and moved `latest` onto them; resume from the bucket then failed, and that step
    could never be published again."""
    save = tmp_path / "save"
    save_checkpoint(save, "global_step5")
    save_checkpoint(save, "global_step7", committed=False)  # killed half-way through its save
    # what DeepSpeed's own pointer said before neox-train owned it
    (save / "latest").write_text("global_step7")
    assert sync_main([str(save), str(tmp_path / "remote"), "--checkpoints", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["published"] == ["global_step5"] and "global_step7" in result["not_published"]
    assert "global_step7" in err and "not complete locally" in err
    backend = open_backend(str(tmp_path / "remote"))
    assert (remote_checkpoints(backend) == ["global_step5"]
            and backend.read_bytes(LATEST) == b"global_step5")
    assert not backend.list("global_step7/")


def test_neox_sync_checkpoints_leaves_another_runs_prefix_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    remote = tmp_path / "remote"
    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    save_checkpoint(theirs, "global_step2", run_id=OTHER_RUN.run_id)
    assert sync_main([str(theirs), str(remote), "--checkpoints"]) == 0
    save_checkpoint(mine, "global_step4")
    capsys.readouterr()
    assert sync_main([str(mine), str(remote), "--checkpoints"]) == 1
    err = capsys.readouterr().err
    assert "global_step4" in err and f"belongs to run {OTHER_RUN.run_id}" in err
    assert remote_checkpoints(open_backend(str(remote))) == ["global_step2"]


def test_plain_sync_never_changes_a_published_checkpoint(strict_backend, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Defect: `neox-sync SAVE_DIR gs://prefix` re-uploaded a same-size, other-crc32c file over a
    COMPLETE tag's and exited 0; the tag then differed from its manifest forever."""
    backend, _proxy = strict_backend
    save = tmp_path / "save"
    save_checkpoint(save, "global_step2")
    assert publish(save, "global_step2", backend)
    before = {name: (f.size, f.crc32c) for name, f in backend.list("").items()}
    optim = save / "global_step2" / "zero" / "optim_states.pt"
    optim.write_bytes(b"p" * 50)  # same size, other bytes
    touch_later(optim)
    assert sync_main([str(save), backend.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to copy" in err and "neox-sync --checkpoints" in err
    assert {name: (f.size, f.crc32c) for name, f in backend.list("").items()} == before
    # The per-write guard stands behind the up-front check (a tag published while a copy runs).
    guard = protect_published(backend, "")
    with pytest.raises(CheckpointConflict, match="published checkpoint"):
        guard("global_step2/zero/optim_states.pt",
              backend.stat("global_step2/zero/optim_states.pt"), backend.list(""))
    fetch_checkpoint(backend, "global_step2", tmp_path / "check")  # still matches its manifest
    # Nor does it write anything else into the run's prefix; next to it, a plain sync works and
    # replaces only what it listed.
    other = make_tree(tmp_path / "other", {"notes/a.txt": b"1"})
    assert sync_main([str(other), backend.url]) == 2
    assert "belongs to run" in capsys.readouterr().err
    beside = backend.url.rstrip("/") + "-notes"
    assert sync_main([str(other), beside]) == 0
    (other / "notes" / "a.txt").write_bytes(b"2")
    assert (sync_main([str(other), beside]) == 0
            and open_backend(beside).read_bytes("notes/a.txt") == b"2")


def test_neox_data_download_skips_existing(backend, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
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
    assert err == ("neox-data: error: nothing to download: no objects under "
                   f"file://{tmp_path}/nothing (check the URL)\n")
