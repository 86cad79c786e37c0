"""The local commit of a checkpoint, tried as a careful user would: torn tags, a damaged `latest`, a
truncated .pt, a full disk. Resume uses only complete, verified tags (falling back to the newest one
with one WARNING line), `--resume latest` with checkpoints present never starts from step 0, a
failed start writes nothing into SAVE_DIR, and a save that cannot be written says so in one line and
leaves every earlier checkpoint resumable."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from neox_train.cli.sync import main as sync_main

from conftest import read_metrics, run_train, test_ds_config, tiny_run_config

pytestmark = pytest.mark.slow  # real training processes (~4 s each)

STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, token_dir):
    """One uninterrupted run, saved at steps 3 and 6: (its folder, its losses by step). Tests copy
    its ckpt/."""
    tmp = tmp_path_factory.mktemp("commit_base")
    run = tiny_run_config(tmp, token_dir, ds_config=str(test_ds_config(tmp, 0)), max_steps=STEPS,
                          save_steps=SAVE_AT)
    run_train(["--config", str(run)])
    return tmp, {step: r["loss"] for step, r in read_metrics(tmp / "logs").items()}


def copy_run(base: Path, tmp_path: Path, token_dir: Path) -> tuple[Path, Path]:
    """A run config of the base run pointing at a copy of its checkpoints: (run.json, save dir)."""
    save = tmp_path / "ckpt"
    shutil.copytree(base / "ckpt", save, symlinks=True)
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=STEPS, save_steps=SAVE_AT)
    return run, save


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def assert_resumed_from(proc: subprocess.CompletedProcess, save: Path, tag: str,
                        losses: dict[int, float], log_dir: Path) -> None:
    assert f"resumed from {save / tag}" in proc.stderr, proc.stderr[-3000:]
    step = int(tag[len("global_step"):])
    resumed = read_metrics(log_dir)
    assert sorted(resumed) == list(range(step + 1, STEPS + 1))
    for s, record in resumed.items():
        assert record["loss"] == pytest.approx(losses[s], abs=1e-6)


def warnings_of(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if " WARNING " in line]


# -- defect 6: a torn tag under `latest` -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["side_files_missing", "empty_run_json", "latest_empty",
                                    "latest_missing_tag", "latest_garbage"])
def test_a_torn_latest_falls_back_to_the_newest_complete_tag(base_run, tmp_path, token_dir, damage):
    base, losses = base_run
    run, save = copy_run(base, tmp_path, token_dir)
    torn = save / "global_step6"
    if damage == "side_files_missing":
        # kill -9 after DeepSpeed's files were written and before ours: only the model states are
        # there
        for name in ("run.json", "config.json"):
            (torn / name).unlink()
    elif damage == "empty_run_json":
        (torn / "run.json").write_bytes(b"")
    elif damage == "latest_empty":
        (save / "latest").write_bytes(b"")
        # the newest complete tag is then global_step3 (an empty pointer names nothing)
        shutil.rmtree(torn)
    elif damage == "latest_missing_tag":
        shutil.rmtree(torn)
    else:
        (save / "latest").write_bytes(b"\xff\xfe\x00garbage")
        shutil.rmtree(torn)
    log_dir = tmp_path / "logs-resumed"
    proc = run_train(["--config", str(run), "--resume", "latest", "--log-dir", str(log_dir)])
    assert_resumed_from(proc, save, "global_step3", losses, log_dir)
    warned = [w for w in warnings_of(proc) if "global_step3" in w]
    assert len(warned) == 1, proc.stderr[-3000:]
    if damage in ("side_files_missing", "empty_run_json"):
        assert "global_step6" in warned[0]
    assert "Traceback" not in proc.stderr


def test_resume_latest_with_only_torn_tags_never_starts_from_step_0(base_run, tmp_path, token_dir):
    base, _ = base_run
    run, save = copy_run(base, tmp_path, token_dir)
    for tag in ("global_step3", "global_step6"):
        (save / tag / "run.json").unlink()
    before = sorted(p.relative_to(save).as_posix() for p in save.rglob("*"))
    proc = run_train(["--config", str(run), "--resume", "latest"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert (line.startswith("neox-train: error:") and "no complete checkpoint" in line
            and "global_step6" in line)
    assert not (tmp_path / "logs" / "metrics.jsonl").exists(), "it trained"
    assert sorted(p.relative_to(save).as_posix() for p in save.rglob("*")) == before


def test_a_fresh_start_never_overwrites_complete_checkpoints(base_run, tmp_path, token_dir):
    """Without --resume in a save dir that holds checkpoints, DeepSpeed would write global_step3
    over the old run's."""
    base, _ = base_run
    run, save = copy_run(base, tmp_path, token_dir)
    before = {p: p.read_bytes() for p in save.rglob("*") if p.is_file()}
    proc = run_train(["--config", str(run)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert "global_step6" in line and "--resume latest" in line
    assert {p: p.read_bytes() for p in save.rglob("*") if p.is_file()} == before


# -- defect 7: a damaged .pt -----------------------------------------------------------------------
def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "flipped"])
def test_a_damaged_checkpoint_is_verified_and_skipped(base_run, tmp_path, token_dir, damage):
    base, losses = base_run
    run, save = copy_run(base, tmp_path, token_dir)
    damage(save / "global_step6" / "mp_rank_00_model_states.pt")
    log_dir = tmp_path / "logs-resumed"
    proc = run_train(["--config", str(run), "--resume", "latest", "--log-dir", str(log_dir)])
    assert_resumed_from(proc, save, "global_step3", losses, log_dir)
    warned = [w for w in warnings_of(proc) if "global_step6" in w and "global_step3" in w]
    assert len(warned) == 1 and "mp_rank_00_model_states.pt" in warned[0], proc.stderr[-3000:]


def test_a_damaged_named_tag_is_one_line_and_a_failed_start_writes_nothing(
        base_run, tmp_path, token_dir):
    base, _ = base_run
    run, save = copy_run(base, tmp_path, token_dir)
    truncate(save / "global_step6" / "mp_rank_00_model_states.pt")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in save.rglob("*") if p.is_file()}
    proc = run_train(["--config", str(run), "--resume", "global_step6"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert (line.startswith("neox-train: error:") and "global_step6" in line
            and "mp_rank_00_model_states.pt" in line)
    assert "Traceback" not in proc.stderr
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in save.rglob("*") if p.is_file()}
    assert after == before, \
        "the failed start changed SAVE_DIR (run_config.json / ds_config.json rewritten?)"


# -- defect 8: the disk fills during a save --------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path, request):
    """A 2.6 MiB tmpfs: room for one tiny checkpoint (1.6 MiB) and the run files, not for two
    (another size with indirect parametrization: the tmpfs size= value)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    size = getattr(request, "param", "2600k")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        small_disk, tmp_path, token_dir):
    save = small_disk / "ckpt"
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=STEPS, save_steps=SAVE_AT, save_dir=str(save))
    proc = run_train(["--config", str(run)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert (line.startswith("neox-train: error:") and str(save) in line
            and "global_step6" in line), line
    assert "free" in line and "MiB" in line
    assert ("Traceback" not in proc.stderr
            and "inline_container" not in proc.stderr), proc.stderr[-3000:]
    assert any("will not fit" in w for w in warnings_of(proc)), \
        "no warning before the save that could not fit"
    assert (save / "latest").read_text() == "global_step3"
    assert not (save / "global_step6").exists(), "the partial tag was left behind"
    # The earlier checkpoint is intact: resume from it on a disk with room.
    roomy = tmp_path / "roomy"
    shutil.copytree(save, roomy)
    log_dir = tmp_path / "logs-resumed"
    proc = run_train(["--config", str(run), "--save-dir", str(roomy), "--log-dir", str(log_dir),
                      "--resume", "latest"])
    assert f"resumed from {roomy / 'global_step3'}" in proc.stderr
    assert sorted(read_metrics(log_dir)) == [4, 5, 6]


# two tiny checkpoints fit, three do not
@pytest.mark.parametrize("small_disk", ["4200k"], indirect=True)
def test_a_restart_on_a_full_disk_makes_room_from_checkpoints_verified_in_the_bucket(
        small_disk, base_run, tmp_path, token_dir):
    """Defect (issue 20, 6): with `latest` intact and the bucket working, a restart failed at its
    first save, every time: the local tags already verified in the bucket were kept (retention runs
    after a save, and keep_last_n does not count what could go). Now a save that will not fit first
    deletes verified tags, oldest first, never the newest complete one, and says so."""
    base, _ = base_run
    bucket = tmp_path / "bucket"
    # global_step3 and 6, verified
    assert sync_main([str(base / "ckpt"), str(bucket), "--checkpoints"]) == 0
    save = small_disk / "ckpt"
    shutil.copytree(base / "ckpt", save, symlinks=True)
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          max_steps=9, save_steps=SAVE_AT, save_dir=str(save), sync_to=str(bucket),
                          keep_last_n=0)
    proc = run_train(["--config", str(run), "--resume", "latest"], check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = [w for w in warnings_of(proc) if "to make room for global_step9" in w]
    assert (len(said) == 1 and "removed local checkpoint(s) global_step3 " in said[0]
            and str(bucket) in said[0])
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step6", "global_step9"]
    assert (save / "latest").read_text() == "global_step9"
    assert ((bucket / "global_step3" / "COMPLETE").is_file()
            and (bucket / "global_step9" / "COMPLETE").is_file())


def test_a_read_only_save_dir_is_one_line_before_training(tmp_path, token_dir):
    """Defect (issue 20, 9): a read-only save dir gave an OSError traceback from writing
    run_config.json once the engine was up. Now it is one line naming the folder, exit 2, before the
    process group and the engine."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    ro = tmp_path / "read-only"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        for save in (ro, ro / "ckpt"):  # the folder itself, or one that cannot be created
            run = tiny_run_config(tmp_path, token_dir, save_dir=str(save))
            proc = run_train(["--config", str(run)], check=False, timeout=120)
            assert proc.returncode == 2, proc.stderr[-3000:]
            line = last_line(proc)
            assert (line.startswith("neox-train: error: save dir") and str(save) in line
                    and "not writable" in line)
            assert ("Read-only file system" in line
                    and "Traceback" not in proc.stderr), proc.stderr[-3000:]
            assert "training neox-tiny" not in proc.stderr  # refused before the loop
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
