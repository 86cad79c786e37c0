"""The upload worker process on its own (real spawn, local-folder bucket): backlog policy and journal."""

from __future__ import annotations

from pathlib import Path

from neox_train.sync_worker import SyncSettings, SyncWorker, journal_pending


def make_tags(save_dir: Path, steps: list[int]) -> list[str]:
    tags = []
    for step in steps:
        tag = f"global_step{step}"
        (save_dir / tag / "sub").mkdir(parents=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * 1000)
        (save_dir / tag / "sub" / "extra.bin").write_bytes(b"x" * step)
        tags.append(tag)
    return tags


def test_backlog_skips_superseded_and_keeps_them_locally(tmp_path):
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [1, 2, 3, 4])
    worker = SyncWorker(SyncSettings(url=str(bucket), save_dir=str(save_dir), max_pending=1))
    for tag in tags:  # queued before the process runs: it sees a backlog of 4 at once
        worker.submit(tag)
    worker.start()
    status = worker.close(timeout_s=120, progress=False)
    # The oldest (possibly mid-upload) and the newest are published; what lies between is skipped, not lost.
    assert status.published == ["global_step1", "global_step4"]
    assert status.skipped == ["global_step2", "global_step3"] and status.pending == []
    assert sorted(p.parent.name for p in bucket.glob("*/COMPLETE")) == ["global_step1", "global_step4"]
    assert (bucket / "latest").read_text().strip() == "global_step4"
    assert all((save_dir / t).is_dir() for t in tags)
    assert journal_pending(save_dir, 0) == []  # skipped tags are not retried by the next run


def test_journal_hands_unfinished_tags_to_the_next_worker(tmp_path):
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [5, 6])
    first = SyncWorker(SyncSettings(url=str(bucket), save_dir=str(save_dir)))
    for tag in tags:
        first.submit(tag)  # journaled, but the process is never started (as if the trainer died right here)
    assert journal_pending(save_dir, 0) == tags
    second = SyncWorker(SyncSettings(url=str(bucket), save_dir=str(save_dir)))
    assert second.start() == tags
    status = second.close(timeout_s=120, progress=False)
    assert status.published == tags and journal_pending(save_dir, 0) == []
    assert sorted(p.parent.name for p in bucket.glob("*/COMPLETE")) == tags


def test_uploads_wait_while_a_checkpoint_is_being_written(tmp_path):
    """The trainer flags its saves; the worker reads no checkpoint file while the flag is up (bounded wait)."""
    import time

    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [7, 8])
    worker = SyncWorker(SyncSettings(url=str(bucket), save_dir=str(save_dir)))
    worker.start()
    worker.submit(tags[0])  # first prove the process is up and uploading (spawn + imports take seconds)
    deadline = time.monotonic() + 120
    while worker.poll().published != tags[:1]:
        assert time.monotonic() < deadline, "the worker never published the first tag"
        time.sleep(0.1)
    worker.set_saving(True)
    worker.submit(tags[1])
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert not list(bucket.glob("global_step8/*.pt")), "a file was uploaded during a save"
        time.sleep(0.05)
    assert worker.poll().published == tags[:1]
    worker.set_saving(False)
    status = worker.close(timeout_s=120, progress=False)
    assert status.published == tags and (bucket / "global_step8" / "COMPLETE").is_file()


def test_save_gate_gives_up_after_its_bound():
    import threading
    import time

    from neox_train.sync_worker import save_gate

    flag = threading.Event()
    flag.set()  # a trainer that died mid-save never clears it
    started = time.monotonic()
    save_gate(flag, max_wait_s=0.3)()
    assert 0.25 <= time.monotonic() - started < 2.0
