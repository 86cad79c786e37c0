"""The upload worker process on its own (real spawn, local-folder bucket): backlog policy, journal,
permanent failures that never block the queue, and what earlier processes published."""

from __future__ import annotations

import time
from pathlib import Path

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.publish.journal import journal_leftovers
from neox_train.checkpoint.publish.owner import Identity, claim
from neox_train.checkpoint.publish.publisher import Publisher
from neox_train.checkpoint.publish.settings import PublishSettings
from neox_train.remote import open_backend

RUN = Identity("0123456789ab", "000000000001")


def make_tags(save_dir: Path, steps: list[int], *, committed: bool = True) -> list[str]:
    tags = []
    for step in steps:
        tag = f"global_step{step}"
        (save_dir / tag / "sub").mkdir(parents=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * 1000)
        (save_dir / tag / "sub" / "extra.bin").write_bytes(b"x" * step)
        if committed:
            commit.commit(save_dir, tag, run_id=RUN.run_id)
        tags.append(tag)
    return tags


def settings(save_dir: Path, bucket: Path, **kw) -> PublishSettings:
    """The worker's settings, with the bucket claimed for RUN first (the trainer does that before it
    starts)."""
    claim(open_backend(str(bucket)), RUN, takeover=True, save_dir=str(save_dir))
    return PublishSettings(url=str(bucket), save_dir=str(save_dir), run_id=RUN.run_id,
                           session=RUN.session, **kw)


def test_backlog_skips_superseded_and_keeps_them_locally(tmp_path):
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [1, 2, 3, 4])
    worker = Publisher(settings(save_dir, bucket, max_pending=1))
    for tag in tags:  # queued before the process runs: it sees a backlog of 4 at once
        worker.committed(tag)
    worker.start()
    status = worker.close(timeout_s=120, progress=False)
    # The oldest (possibly mid-upload) and the newest are published; what lies between is skipped,
    # not lost.
    assert status.published == ["global_step1", "global_step4"]
    assert status.skipped == ["global_step2", "global_step3"] and status.pending == []
    assert (sorted(p.parent.name for p in bucket.glob("*/COMPLETE"))
            == ["global_step1", "global_step4"])
    assert (bucket / "latest").read_text().strip() == "global_step4"
    assert all((save_dir / t).is_dir() for t in tags)
    assert journal_leftovers(save_dir, 0) == []  # skipped tags are not retried by the next run


def test_journal_hands_unfinished_tags_to_the_next_worker(tmp_path):
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [5, 6])
    first = Publisher(settings(save_dir, bucket))
    for tag in tags:
        # journaled, but the process is never started (as if the trainer died right here)
        first.committed(tag)
    assert journal_leftovers(save_dir, 0) == tags
    second = Publisher(settings(save_dir, bucket))
    assert second.start() == tags
    status = second.close(timeout_s=120, progress=False)
    assert status.published == tags and journal_leftovers(save_dir, 0) == []
    assert sorted(p.parent.name for p in bucket.glob("*/COMPLETE")) == tags


def test_uploads_wait_while_a_checkpoint_is_being_written(tmp_path):
    """The trainer flags its saves; the worker reads no checkpoint file while the flag is up
    (bounded wait)."""
    import time

    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [7, 8])
    worker = Publisher(settings(save_dir, bucket))
    worker.start(resume_journal=False)
    # first prove the process is up and uploading (spawn + imports take seconds)
    worker.committed(tags[0])
    deadline = time.monotonic() + 120
    while worker.poll().published != tags[:1]:
        assert time.monotonic() < deadline, "the worker never published the first tag"
        time.sleep(0.1)
    worker.hold_uploads(True)
    worker.committed(tags[1])
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert not list(bucket.glob("global_step8/*.pt")), "a file was uploaded during a save"
        time.sleep(0.05)
    assert worker.poll().published == tags[:1]
    worker.hold_uploads(False)
    status = worker.close(timeout_s=120, progress=False)
    assert status.published == tags and (bucket / "global_step8" / "COMPLETE").is_file()


def test_save_gate_gives_up_after_its_bound():
    import threading
    import time

    from neox_train.checkpoint.publish.process import save_gate

    flag = threading.Event()
    flag.set()  # a trainer that died mid-save never clears it
    started = time.monotonic()
    save_gate(flag, max_wait_s=0.3)()
    assert 0.25 <= time.monotonic() - started < 2.0


def test_a_permanent_failure_gives_that_checkpoint_up_and_the_queue_goes_on(tmp_path):
    """Defect: a CheckpointConflict was retried with backoff forever while every later checkpoint
    waited."""
    from neox_train.checkpoint.publish.protocol import finalize_checkpoint, upload_checkpoint_part

    save_dir, bucket, other = tmp_path / "ckpt", tmp_path / "bucket", tmp_path / "other"
    make_tags(other, [2])
    # same size, other bytes
    (other / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"Z" * 1000)
    (other / "global_step2" / commit.MARKER).unlink()
    commit.commit(other, "global_step2", run_id=RUN.run_id)
    backend = open_backend(str(bucket))
    claim(backend, RUN, takeover=True, save_dir=str(other))
    upload_checkpoint_part(other, "global_step2", backend, identity=RUN)
    # published with other content
    assert finalize_checkpoint(backend, "global_step2", identity=RUN)
    tags = make_tags(save_dir, [2, 4])
    # a retry would outlast the test
    worker = Publisher(settings(save_dir, bucket, retry_initial_s=60))
    worker.start(resume_journal=False)
    for tag in tags:
        worker.committed(tag)
    status = worker.close(timeout_s=60, progress=False)
    assert status.published == ["global_step4"] and list(status.failed) == ["global_step2"]
    assert "already published (COMPLETE) with different content" in status.failed["global_step2"]
    assert status.failures == 0, "a permanent failure was retried"
    assert (save_dir / "global_step2").is_dir(), \
        "a checkpoint that could not be published must stay local"
    assert status.unpublished == ["global_step2"] and status.metrics(retries=0)["failed"] == 1
    # The next run tries it again (the cause may be fixed by then).
    assert journal_leftovers(save_dir, 0) == ["global_step2"]


def test_what_earlier_processes_published_is_reported_as_verified(tmp_path):
    """Retention may delete a tag published by an earlier process: the worker checks the bucket at
    start."""
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [1, 2, 3])
    first = Publisher(settings(save_dir, bucket))
    first.start(resume_journal=False)
    for tag in tags[:2]:
        first.committed(tag)
    assert first.close(timeout_s=60, progress=False).published == tags[:2]
    # global_step2 then changes locally (a new save of that step): it is not what the bucket holds
    # any more.
    (save_dir / "global_step2" / "sub" / "extra.bin").write_bytes(b"y" * 2)
    (save_dir / "global_step2" / commit.MARKER).unlink()
    commit.commit(save_dir, "global_step2", run_id=RUN.run_id)
    second = Publisher(settings(save_dir, bucket))
    second.start(resume_journal=False)
    import time

    deadline = time.monotonic() + 60
    while "global_step1" not in second.poll().published and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second.poll().published == ["global_step1"]
    second.abort()


def test_a_complete_tag_never_queued_is_handed_over_and_a_torn_one_is_not(tmp_path):
    """A kill between a tag's commit and its journal line: the next worker still publishes it."""
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    make_tags(save_dir, [5])
    make_tags(save_dir, [6], committed=False)
    worker = Publisher(settings(save_dir, bucket))
    assert worker.start() == ["global_step5"]
    assert worker.close(timeout_s=60, progress=False).published == ["global_step5"]


def test_step_0_is_a_published_step():
    """`step_of_tag(tag) or -1` once turned global_step0 into -1 (no step published)."""
    from neox_train.checkpoint.publish.status import PublishStatus

    status = PublishStatus(pending=["global_step0"])
    status.record_published("global_step0", lag_s=0.1, bytes_uploaded=1, files_uploaded=1,
                            files_skipped=0)
    assert status.last_published_step == 0 and status.pending == []


def test_a_sigterm_to_the_job_while_the_worker_starts_does_not_stop_it(tmp_path):
    """Defect (CI, the SIGTERM-at-a-random-step test): the scheduler signals the whole process
    group. The worker ignored SIGTERM only once its own code ran, seconds after spawn on a busy
    machine; a SIGTERM before that killed it, and the trainer's next submit died with
    BrokenPipeError, so the preemption save was never published."""
    import os
    import signal

    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [3])
    worker = Publisher(settings(save_dir, bucket))
    worker.start(resume_journal=False)
    os.kill(worker.pid, signal.SIGTERM)  # at once: the child is still starting the interpreter
    os.kill(worker.pid, signal.SIGINT)  # Ctrl-C reaches the whole group too
    worker.committed(tags[0])
    status = worker.close(timeout_s=120, progress=False)
    assert status.published == tags and status.worker_restarts == 0
    assert (bucket / "global_step3" / "COMPLETE").is_file()


def test_a_worker_killed_from_outside_is_restarted_with_what_was_pending(tmp_path, caplog):
    """The OOM killer (or a person) kills the upload process: the trainer's calls never raise, the
    worker is started again, and every checkpoint it had not published is published, in order."""
    import logging
    import os
    import signal
    import time

    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [1, 2, 3])
    worker = Publisher(settings(save_dir, bucket))
    worker.start(resume_journal=False)
    # hold uploads: tags 1 and 2 are queued, unpublished, when the kill comes
    worker.hold_uploads(True)
    worker.committed(tags[0])
    worker.committed(tags[1])
    dead = worker.pid
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    with caplog.at_level(logging.ERROR, logger="neox_train"):
        worker.committed(tags[2])  # must not raise: the worker is restarted with 1, 2 and then 3
        worker.hold_uploads(False)  # the new process sees the trainer's current save state
        status = worker.close(timeout_s=120, progress=False)
    assert worker.pid != dead
    assert status.published == tags and status.pending == [] and status.worker_restarts == 1
    assert sorted(p.parent.name for p in bucket.glob("*/COMPLETE")) == tags
    assert journal_leftovers(save_dir, 0) == []
    assert any("upload worker died (killed by SIGKILL)" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_worker_that_keeps_dying_is_restarted_with_backoff_and_never_blocks(
        tmp_path, monkeypatch):
    """A worker that dies again at once is not respawned in a loop: the next start waits (doubling),
    and the trainer's calls return at once meanwhile."""
    import os
    import signal
    import time

    from neox_train.checkpoint.publish import publisher

    # however slow this machine is today
    monkeypatch.setattr(publisher, "WORKER_RESTART_WAIT_S", 120.0)
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [1])
    worker = Publisher(settings(save_dir, bucket))
    worker.start(resume_journal=False)
    for expected in (1, 2):
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while worker.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        worker.poll()
        # Never the backoff's wait (120 s, above): a spawn at most, however loaded the machine.
        assert time.monotonic() - started < 60.0 and worker.status.published == []
        if expected == 1:
            assert worker.status.worker_restarts == 1 and worker.alive
    assert (worker.status.worker_restarts == 1
            and not worker.alive), "restarted again without waiting"
    worker.committed(tags[0])  # queued while the worker is down: not lost
    assert worker.status.pending == tags
    worker.abort()


def test_a_second_node_at_exit_hands_its_uploaded_parts_to_node_0_without_waiting(tmp_path):
    """With node-local storage, a node other than 0 uploads its part; node 0 publishes the
    checkpoint. At exit that node is done once its parts are up: it never waits for a COMPLETE that
    node 0 may have given up on (it sat out the whole upload timeout, and the launcher with it), and
    it does not call the checkpoint unpublished."""
    save_dir, bucket = tmp_path / "ckpt", tmp_path / "bucket"
    tags = make_tags(save_dir, [2, 4])
    worker = Publisher(settings(save_dir, bucket, node_rank=1, num_nodes=2, finalizes=False))
    worker.start()
    for tag in tags:
        worker.committed(tag)
    started = time.monotonic()
    status = worker.close(timeout_s=60, progress=False)
    assert time.monotonic() - started < 15
    assert status.handed == tags and status.unpublished == [] and status.published == []
    for tag in tags:
        assert ((bucket / tag / ".parts" / "node-1.json").is_file()
                and not (bucket / tag / "COMPLETE").exists())
    # Still in the journal: the next start sees node 0's verdict (COMPLETE remote, or uploads the
    # part again).
    assert journal_leftovers(save_dir, 1) == tags
