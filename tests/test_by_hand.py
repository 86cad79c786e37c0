"""What a person does by hand (issue 20): a hand-run neox-sync, the same command twice in one save dir. Each gets
the guarantees the trainer's own paths have: nothing published that is not a checkpoint saved as it is, nothing
written into a prefix a run owns, no second process in a save dir a live one holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from neox_train.checkpoint import commit
from neox_train.checkpoint.fetch import remote_checkpoints
from neox_train.checkpoint.owner import Identity, claim
from neox_train.cli.sync import main as sync_main
from neox_train.remote import open_backend

from gcs import gcs_bucket, gcs_emulator  # noqa: F401

RUN = Identity("00000000abcd", "000000000001")


def committed_tag(save_dir: Path, step: int) -> Path:
    folder = save_dir / f"global_step{step}"
    (folder / "zero").mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(bytes([step]) * 4000)
    (folder / "zero" / "optim_states.pt").write_bytes(b"o" * 3000)
    commit.commit(save_dir, folder.name, run_id=RUN.run_id)
    return folder


def names(backend) -> dict[str, int]:
    return {name: f.generation for name, f in backend.list("").items()}


def test_plain_sync_refuses_what_looks_like_a_published_tag(gcs_bucket, tmp_path: Path, capsys) -> None:
    """Defect (a): a folder holding config.json, manifest.json, COMPLETE and run.json copied from a published tag
    was uploaded by `neox-sync S gs://B/P` (exit 0): P then had a COMPLETE tag whose manifest listed files that do
    not exist."""
    src = tmp_path / "S" / "global_step99"
    src.mkdir(parents=True)
    for name in ("config.json", "manifest.json", "COMPLETE", "run.json"):
        (src / name).write_text(json.dumps({"tag": "global_step99", "files": {"mp_rank_00_model_states.pt": {}}}))
    url = f"gs://{gcs_bucket}/P"
    assert sync_main([str(tmp_path / "S"), url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to copy" in err and "neox-sync --checkpoints" in err
    # Named by the tag folder itself, the same files are refused too (COMPLETE lands at the root then).
    assert sync_main([str(src), f"{url}/global_step99"]) == 2
    assert "refusing to copy" in capsys.readouterr().err
    assert names(open_backend(url)) == {} and remote_checkpoints(open_backend(url)) == []


def test_plain_sync_never_writes_into_a_prefix_a_run_owns(gcs_bucket, tmp_path: Path, capsys) -> None:
    """Defect (b): `neox-sync` of a finished run's save dir into a live run's prefix before that run's first
    checkpoint exited 0 and moved `latest` to a tag that is never COMPLETE there."""
    finished = tmp_path / "finished"
    committed_tag(finished, 24)
    url = f"gs://{gcs_bucket}/live"
    claim(open_backend(url), RUN, takeover=False, save_dir=str(tmp_path / "live-save"))  # the live run's start
    before = names(open_backend(url))
    assert sync_main([str(finished), url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing" in err
    # Plain files, into the prefix or a folder below it, or into a folder above that would land inside it: refused.
    notes = tmp_path / "notes"
    (notes / "live").mkdir(parents=True)
    (notes / "live" / "a.txt").write_text("x")
    assert sync_main([str(notes / "live"), url]) == 2
    assert "belongs to run 00000000abcd" in capsys.readouterr().err
    assert sync_main([str(notes / "live"), f"{url}/sub"]) == 2
    assert sync_main([str(notes), f"gs://{gcs_bucket}"]) == 2
    assert "owned by a training run" in capsys.readouterr().err
    assert names(open_backend(url)) == before and open_backend(url).read_bytes("latest") is None
    assert sync_main([str(notes / "live"), f"gs://{gcs_bucket}/elsewhere"]) == 0  # anywhere else: a plain copy


def test_checkpoints_sync_publishes_only_files_as_they_were_saved(gcs_bucket, tmp_path: Path, capsys) -> None:
    """Defect (c): after one byte of a .pt changed (and its mtime), `neox-sync --checkpoints` published the tag as
    COMPLETE with the corrupted file's crc32c, although its local marker records the original one."""
    save = tmp_path / "save"
    good = committed_tag(save, 3)
    bad = committed_tag(save, 6)
    pt = bad / "mp_rank_00_model_states.pt"
    data = bytearray(pt.read_bytes())
    data[100] ^= 0xFF
    pt.write_bytes(bytes(data))  # same size, new mtime
    url = f"gs://{gcs_bucket}/run"
    assert sync_main([str(save), url, "--checkpoints"]) == 1
    err = capsys.readouterr().err
    assert "not published global_step6" in err and "changed after the save" in err
    assert remote_checkpoints(open_backend(url)) == [good.name]
    assert open_backend(url).read_bytes("latest") == b"global_step3"
    assert not any(n.startswith("global_step6/") for n in names(open_backend(url)))
    # Put back as saved, it publishes.
    data[100] ^= 0xFF
    pt.write_bytes(bytes(data))
    assert sync_main([str(save), url, "--checkpoints"]) == 0
    assert remote_checkpoints(open_backend(url)) == [good.name, bad.name]


def test_plain_sync_rules_hold_for_folder_destinations(tmp_path: Path, capsys) -> None:
    """The same rules whatever the destination is: a folder used as --sync-to is a bucket too."""
    save = tmp_path / "save"
    committed_tag(save, 2)
    dest = tmp_path / "dest"
    assert sync_main([str(save), str(dest)]) == 2
    assert not dest.exists() or not any(dest.rglob("*"))
    shutil.rmtree(save)
    (save / "notes").mkdir(parents=True)
    (save / "notes" / "latest").write_text("global_step9")
    assert sync_main([str(save), str(dest)]) == 2
    assert "latest" in capsys.readouterr().err
