"""What a person does by hand (issue 20): a hand-run neox-sync, the same command twice in one save
dir. Each gets the guarantees the trainer's own paths have: nothing published that is not a
checkpoint saved as it is, nothing written into a prefix a run owns, no second process in a save dir
a live one holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.publish.fetch import remote_checkpoints
from neox_train.checkpoint.publish.owner import OWNER, Identity, claim
from neox_train.checkpoint.publish.publisher import Publisher
from neox_train.checkpoint.publish.settings import PublishSettings
from neox_train.cli.sync import main as sync_main
from neox_train.remote import open_backend

from conftest import BIN, run_train, tiny_run_config, train_env
from gcs import FaultProxy, free_port, gcs_bucket, gcs_emulator  # noqa: F401

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


def test_plain_sync_refuses_what_looks_like_a_published_tag(gcs_bucket, tmp_path: Path,
                                                            capsys) -> None:
    """Defect (a): a folder holding config.json, manifest.json, COMPLETE and run.json copied from a
    published tag was uploaded by `neox-sync S gs://B/P` (exit 0): P then had a COMPLETE tag whose
    manifest listed files that do not exist."""
    src = tmp_path / "S" / "global_step99"
    src.mkdir(parents=True)
    for name in ("config.json", "manifest.json", "COMPLETE", "run.json"):
        (src / name).write_text(json.dumps({"tag": "global_step99",
                                            "files": {"mp_rank_00_model_states.pt": {}}}))
    url = f"gs://{gcs_bucket}/P"
    assert sync_main([str(tmp_path / "S"), url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to copy" in err and "neox-sync --checkpoints" in err
    # Named by the tag folder itself, the same files are refused too (COMPLETE lands at the root
    # then).
    assert sync_main([str(src), f"{url}/global_step99"]) == 2
    assert "refusing to copy" in capsys.readouterr().err
    assert names(open_backend(url)) == {} and remote_checkpoints(open_backend(url)) == []


def test_plain_sync_never_writes_into_a_prefix_a_run_owns(gcs_bucket, tmp_path: Path,
                                                          capsys) -> None:
    """Defect (b): `neox-sync` of a finished run's save dir into a live run's prefix before that
    run's first checkpoint exited 0 and moved `latest` to a tag that is never COMPLETE there."""
    finished = tmp_path / "finished"
    committed_tag(finished, 24)
    url = f"gs://{gcs_bucket}/live"
    # the live run's start
    claim(open_backend(url), RUN, takeover=False, save_dir=str(tmp_path / "live-save"))
    before = names(open_backend(url))
    assert sync_main([str(finished), url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing" in err
    # Plain files, into the prefix or a folder below it, or into a folder above that would land
    # inside it: refused.
    notes = tmp_path / "notes"
    (notes / "live").mkdir(parents=True)
    (notes / "live" / "a.txt").write_text("x")
    assert sync_main([str(notes / "live"), url]) == 2
    assert "belongs to run 00000000abcd" in capsys.readouterr().err
    assert sync_main([str(notes / "live"), f"{url}/sub"]) == 2
    assert sync_main([str(notes), f"gs://{gcs_bucket}"]) == 2
    assert "owned by a training run" in capsys.readouterr().err
    assert names(open_backend(url)) == before and open_backend(url).read_bytes("latest") is None
    # anywhere else: a plain copy
    assert sync_main([str(notes / "live"), f"gs://{gcs_bucket}/elsewhere"]) == 0


def test_checkpoints_sync_publishes_only_files_as_they_were_saved(
        gcs_bucket, tmp_path: Path, capsys) -> None:
    """Defect (c): after one byte of a .pt changed (and its mtime), `neox-sync --checkpoints`
    published the tag as COMPLETE with the corrupted file's crc32c, although its local marker
    records the original one."""
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


# -- the same command twice, Ctrl-C ----------------------------------------------------------------
class Background:
    """`neox-train ARGS` in the background, in its own process group (a failing test kills all of
    it), its output in a file (a pipe nobody reads would fill and block the run)."""

    def __init__(self, args: list[str], out: Path, extra_env: dict[str, str] | None = None, *,
                 program: str = "neox-train", cwd: Path | None = None):
        self.out = out
        with open(out, "w") as f:
            self.proc = subprocess.Popen([str(BIN / program), *args], stdout=f,
                                         stderr=subprocess.STDOUT, cwd=cwd, text=True,
                                         env={**train_env(), **(extra_env or {})},
                                         start_new_session=True)
        self.pid = self.proc.pid

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, what: str, check, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the run ended ({self.proc.returncode}) before {what}: {self.text()[-4000:]}")
            assert time.monotonic() < deadline, \
                f"timed out waiting for {what}: {self.text()[-4000:]}"
            time.sleep(0.1)

    def finish(self, timeout: float) -> tuple[int, str]:
        """(exit status, output); past `timeout` the group is killed and the test fails."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(
                f"the run did not end within {timeout} s: {self.text()[-4000:]}") from None
        return self.proc.returncode, self.text()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()


def published(remote: Path) -> list[str]:
    return sorted((p.parent.name for p in remote.glob("global_step*/COMPLETE")),
                  key=lambda t: int(t[11:]))


# a run that lives long enough to be acted on
SLOW = {"NEOX_FAULT": "slow@step=1,count=1000,seconds=0.25"}


@pytest.mark.slow
def test_a_second_launch_is_refused_and_ctrl_c_saves_like_sigterm(
        tmp_path: Path, token_dir: Path) -> None:
    """Defects 2 and 3. The same command started twice in one save dir: the second claimed the
    prefix and died at its first save, and the first could publish nothing more (PrefixOwned, exit
    1). Ctrl-C gave KeyboardInterrupt tracebacks, saved nothing and exited 130. Now the second is
    refused before it claims anything; a first Ctrl-C saves the step, publishes it and exits 130; a
    second one stops at once with one line."""
    remote = tmp_path / "bucket"
    run = tiny_run_config(tmp_path, token_dir, max_steps=400, save_steps=4, eval_steps=0,
                          sync_to=str(remote))
    # the command a supervisor (or a person) repeats
    args = ["--config", str(run), "--resume", "auto"]
    with Background(args, tmp_path / "first.log", SLOW) as first:
        first.wait_for("the first published checkpoint", lambda: published(remote))
        owner = (remote / OWNER).read_bytes()
        second = run_train(args, check=False, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        line = [x for x in second.stderr.splitlines() if x.startswith("neox-train:")]
        assert (len(line) == 1 and "is in use by another live process" in line[0]
                and f"pid {first.pid}" in line[0])
        assert "Traceback" not in second.stderr
        assert (remote / OWNER).read_bytes() == owner, \
            "the refused launch touched the prefix's owner"
        # Ctrl-C (to the process: a terminal sends it to the group alike)
        first.proc.send_signal(signal.SIGINT)
        code, err = first.finish(120)
    assert code == 130, err[-6000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-4000:]
    saved = (tmp_path / "ckpt" / "latest").read_text()
    assert "Ctrl-C: saving step" in err and f"stop requested (SIGINT) at step {saved[11:]}" in err
    assert published(remote)[-1] == saved, "the interrupted step was not published"
    assert (remote / "latest").read_text() == saved

    # Resumed, then Ctrl-C twice: stopped at once, one line saying what was not saved. (Steps of a
    # second: the second Ctrl-C comes well inside the step the first one arrived in, however loaded
    # the machine.)
    with Background(args, tmp_path / "again.log",
                    {"NEOX_FAULT": "slow@step=1,count=1000,seconds=1.5"}) as again:
        again.wait_for("a step after the resume",
                       lambda: " INFO step " in again.text().partition("training neox")[2])
        again.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        # the first was handled: the second is a second
        while "Ctrl-C: saving step" not in again.text():
            assert time.monotonic() < deadline, again.text()[-3000:]
            time.sleep(0.005)
        again.proc.send_signal(signal.SIGINT)
        code, err = again.finish(60)
    assert code == 130, err[-4000:]
    said = [x[x.index("neox-train:"):] for x in err.splitlines() if "second Ctrl-C" in x]
    at = int(err.split("Ctrl-C: saving step ")[1].split()[0])
    newest = (tmp_path / "ckpt" / "latest").read_text()
    assert len(said) == 1 and said[0].startswith(
        f"neox-train: second Ctrl-C: stopped at once; step {at} was not saved (the newest complete "
        # then what is not published yet, if anything
        f"checkpoint is {newest} in {tmp_path / 'ckpt'})"), err[-3000:]
    assert int(newest[11:]) < at and "Traceback" not in err and "leaked" not in err, err[-3000:]


# -- a dead endpoint, SIGTERM during the end-of-run flush ------------------------------------------
def test_a_refused_endpoint_is_warned_of_and_its_checkpoints_count_as_stuck(
        gcs_bucket, tmp_path: Path, caplog) -> None:
    """Defect 5 at the worker: connections refused made every request retry inside the client for
    its whole deadline (10 minutes) before the trainer heard of a failure: no warning, and
    max_unpublished_checkpoints never counted the waiting checkpoints. Now one WARNING names the
    endpoint and the unpublished checkpoints after unreachable_warning_s, and from then on they are
    stuck (the limit applies)."""
    save = tmp_path / "save"
    tags = [committed_tag(save, 2).name, committed_tag(save, 4).name]
    url = f"gs://{gcs_bucket}/run"
    claim(open_backend(url), RUN, takeover=False, save_dir=str(save))
    proxy = FaultProxy(os.environ["STORAGE_EMULATOR_HOST"], lifetime_s=120)
    proxy.close()  # nothing listens there now: every connection is refused
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", proxy.url)  # the worker process inherits it
        worker = Publisher(PublishSettings(url=url, save_dir=str(save), run_id=RUN.run_id,
                                           session=RUN.session, unreachable_warning_s=2.0))
        worker.start(resume_journal=False)
    try:
        started = time.monotonic()
        for tag in tags:
            worker.committed(tag)
        with caplog.at_level("WARNING", logger="neox_train"):
            while not worker.poll().failing:
                assert time.monotonic() - started < 60, \
                    "no word of the dead endpoint within a minute"
                time.sleep(0.1)
        seconds = time.monotonic() - started
        assert worker.status.stuck == tags  # what max_unpublished_checkpoints counts
        said = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
        assert (len(said) == 1 and proxy.url.removeprefix("http://") in said[0]
                and "2 checkpoint(s) unpublished" in said[0]
                and "global_step2, global_step4" in said[0]), said
        assert seconds < 2.0 + 30, f"warned after {seconds:.1f} s"
    finally:
        status = worker.close(timeout_s=1, progress=False)
    assert status.unpublished == tags and not status.published


@pytest.mark.slow
def test_sigterm_during_the_flush_to_a_dead_endpoint_exits_within_the_grace(
        gcs_bucket, tmp_path: Path, token_dir: Path) -> None:
    """Defects 4 and 5 in a run: the endpoint refuses connections from mid-run. It was silent for
    minutes, and a SIGTERM during the end-of-run flush left the process alive past 150 s (the flush
    waited for upload_timeout_s). Now the run warns within unreachable_warning_s, and exits within
    preemption_grace_s of the SIGTERM saying what stays unpublished."""
    url = f"gs://{gcs_bucket}/run"
    proxy = FaultProxy(os.environ["STORAGE_EMULATOR_HOST"], lifetime_s=600, max_requests=100_000)
    grace = 6.0
    run = tiny_run_config(tmp_path, token_dir, max_steps=30, save_steps=4, eval_steps=0,
                          sync_to=url, unreachable_warning_s=2.0, preemption_grace_s=grace,
                          max_unpublished_checkpoints=0, upload_timeout_s=1800.0)
    direct = open_backend(url)
    with Background(["--config", str(run)], tmp_path / "run.log",
                    {**SLOW, "STORAGE_EMULATOR_HOST": proxy.url}) as job:
        job.wait_for("the first published checkpoint", lambda: remote_checkpoints(direct))
        proxy.close()
        closed = time.monotonic()
        job.wait_for("the dead endpoint's warning", lambda: "has not answered for" in job.text(),
                     timeout=60)
        warned = time.monotonic() - closed
        job.wait_for("the end-of-run flush", lambda: "sync: waiting up to" in job.text(),
                     timeout=120)
        job.proc.send_signal(signal.SIGTERM)
        term = time.monotonic()
        code, out = job.finish(60)
        exited = time.monotonic() - term
    # for the notes
    print(f"warned {warned:.1f} s after the endpoint died; exited {exited:.1f} s after SIGTERM")
    assert warned < 2.0 + 30, f"the warning came {warned:.1f} s after the endpoint died"
    assert exited < grace + 10, f"exited {exited:.1f} s after SIGTERM (grace {grace} s)"
    assert code == 1 and "Traceback" not in out, out[-4000:]
    last = out.strip().splitlines()[-1]
    assert (last.startswith("neox-train: error:") and "not published" in last
            and "global_step28" in last), last
    assert "stopped by a signal during the upload flush" in out
    published_now = remote_checkpoints(direct)
    assert "global_step28" not in published_now and (tmp_path / "ckpt" / "global_step28").is_dir()


def test_checkpoints_sync_refuses_a_save_dir_a_live_process_holds(tmp_path: Path, capsys) -> None:
    """A hand-run `neox-sync --checkpoints` while the run in that save dir is alive would be a
    second publisher of the same tags: refused with one line naming the holder; a read-only copy of
    a save dir (nothing trains there) still publishes."""
    save = tmp_path / "save"
    committed_tag(save, 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from neox_train.checkpoint.local.lock import "
                               "lock_save_dir; lock_save_dir(sys.argv[1], why='x'); print('held', "
                               "flush=True); time.sleep(120)", str(save)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert sync_main([str(save), str(tmp_path / "bucket"), "--checkpoints"]) == 2
        err = capsys.readouterr().err
        assert (err.count("\n") == 1 and f"pid {holder.pid}" in err
                and "publishes these checkpoints itself" in err)
        assert not (tmp_path / "bucket").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone
    assert sync_main([str(save), str(tmp_path / "bucket"), "--checkpoints"]) == 0


@pytest.mark.slow
def test_ctrl_c_to_neox_launch_without_the_supervisor(tmp_path: Path, token_dir: Path) -> None:
    """Plain `neox-launch` (no --max-restarts): Ctrl-C goes to the whole job; the ranks save the
    step and the launch exits 130 (deepspeed's launch.py exits 1 after a signal, which read as a
    crash), with no tracebacks."""
    run = tiny_run_config(tmp_path, token_dir, max_steps=400, save_steps=1000, eval_steps=0)
    log = tmp_path / "logs" / "training.log"
    with Background(["--gpus", "2", "--zero", "0", "--config", str(run), "--master-port",
                     str(free_port())],
                    tmp_path / "launch.log", SLOW, program="neox-launch", cwd=tmp_path) as job:
        job.wait_for("step 2", lambda: log.exists() and "step 2:" in log.read_text())
        job.proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to neox-launch
        code, out = job.finish(120)
    assert code == 130, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    saved = (tmp_path / "ckpt" / "latest").read_text()
    assert f"stop requested (SIGINT) at step {saved[11:]}" in log.read_text()
