"""neox-eval: lm-evaluation-harness on a run's checkpoints, from a process beside the training (the
emulated bucket it publishes to), with a local task (tests/data/eval_task: a task YAML over a small
local data file, no hub download). Its results equal lm_eval's own run on the same converted
folder, and reach the run's trackers (a real `mlflow server`, W&B offline files, TensorBoard)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, communicate_or_kill, run_train, test_ds_config, tiny_run_config
from gcs import direct_client, gcs_bucket, gcs_emulator  # noqa: F401
from trackers import experiment_name, mlflow_server, wandb_runs  # noqa: F401

TASKS = REPO / "tests" / "data" / "eval_task"
TASK = "neox_tiny_cloze"


def eval_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """lm-eval and the hub libraries offline, their caches in the test's folder."""
    from conftest import train_env

    return {**train_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf-home"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            **extra}


def neox_eval(args: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "neox-eval"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_watch_evaluates_each_published_checkpoint_beside_a_running_training(
        prepared_dir, tmp_path, gcs_emulator, gcs_bucket, mlflow_server):  # noqa: F811
    url = f"gs://{gcs_bucket}/run"
    project = experiment_name()
    run = tiny_run_config(tmp_path, prepared_dir, ds_config=str(test_ds_config(tmp_path, 2)),
                          vocab_size=None, max_steps=8, save_steps=4, eval_steps=4, sync_to=url,
                          report_to="tensorboard,wandb,mlflow", tracker_project=project)
    env = eval_env(tmp_path, MLFLOW_TRACKING_URI=mlflow_server.url)
    # The watcher first: it waits for the run's checkpoints to be published.
    watcher = subprocess.Popen(
        [str(BIN / "neox-eval"), "--watch", url, "--tasks", TASK, "--include-path", str(TASKS),
         "--interval", "1", "--keep-hf", str(tmp_path / "hf"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    run_train(["--config", str(run)], extra_env=env)
    out, err = communicate_or_kill(watcher, timeout=300)
    # a failed try is retried (the watch's rule); its line, if any, says why
    failures = "\n".join(line for line in err.splitlines() if ": failed (" in line)
    assert watcher.returncode == 0, f"{failures}\n{err[-3000:]}"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["evaluated"] == ["global_step4", "global_step8"] and summary["failed"] == {}
    assert "global_step8 is the run's final checkpoint (its max_steps): stopping" in err

    # Results beside the tags, never inside one: each tag holds what its manifest lists.
    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    names = sorted(b.name.removeprefix("run/") for b in bucket.list_blobs(prefix="run/"))
    assert [n for n in names if n.startswith("eval/")] == [
        f"eval/global_step4/{TASK}.json", f"eval/global_step8/{TASK}.json"]
    for tag in ("global_step4", "global_step8"):
        manifest = json.loads(bucket.blob(f"run/{tag}/manifest.json").download_as_bytes())
        inside = {n.removeprefix(f"{tag}/") for n in names
                  if n.startswith(f"{tag}/") and not n.startswith(f"{tag}/.parts/")}
        assert inside == set(manifest["files"]) | {"manifest.json", "COMPLETE"}
    record = json.loads(bucket.blob(f"run/eval/global_step8/{TASK}.json").download_as_bytes())
    assert record["step"] == 8 and record["tag"] == "global_step8" and record["task"] == TASK
    run_id = record["run_id"]

    # lm_eval's own run on the same converted folder gives the same results.
    lm_out = tmp_path / "lm_eval_out"
    lm = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf", "--model_args", record["model_args"], "--tasks",
         TASK, "--include_path", str(TASKS), "--device", "cpu", "--batch_size",
         record["batch_size"], "--output_path", str(lm_out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert lm.returncode == 0, lm.stderr[-3000:]
    theirs = json.loads(next(lm_out.rglob("results_*.json")).read_text())
    assert record["results"][TASK] == theirs["results"][TASK]
    assert record["versions"] == {TASK: theirs["versions"][TASK]}

    # The run's trackers, at each checkpoint's step.
    mlrun = mlflow_server.runs(project)[0]
    assert mlrun.data.tags["neox_run_id"] == run_id
    acc = mlflow_server.history(mlrun.info.run_id, f"downstream/{TASK}/acc")
    assert sorted(s for s, _ in acc) == [4, 8]
    assert dict(acc)[8] == pytest.approx(record["results"][TASK]["acc,none"])
    [evals] = wandb_runs(tmp_path / "logs" / "wandb", f"{run_id}-eval")
    assert [(r["checkpoint/step"], r[f"downstream/{TASK}/acc"]) for r in evals.rows] == [
        (4, dict(acc)[4]), (8, dict(acc)[8])]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "logs" / "tensorboard" / "downstream"))
    board.Reload()
    assert [e.step for e in board.Scalars(f"downstream/{TASK}/acc")] == [4, 8]

    # A restarted watcher finds every result there and evaluates nothing.
    started = time.perf_counter()
    again = neox_eval(["--watch", url, "--once", "--tasks", TASK, "--include-path", TASKS,
                       "--json"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["evaluated"] == []
    assert time.perf_counter() - started < 60


def test_the_default_tasks_are_lm_evals_own():
    """The Pythia set is known to the installed lm-eval by these names (their data is on the hub;
    nothing is downloaded here)."""
    from neox_train.eval import harness

    manager = harness.task_manager(list(harness.DEFAULT_TASKS), None)
    assert set(harness.expand_tags(list(harness.DEFAULT_TASKS), manager)) == set(
        harness.DEFAULT_TASKS)


def test_a_tag_names_its_member_tasks():
    from neox_train.eval import harness

    manager = harness.task_manager(["neox_tiny_tasks", TASK], str(TASKS))
    assert harness.expand_tags(["neox_tiny_tasks", TASK, "neox_tiny_lambada"], manager) == [
        TASK, "neox_tiny_lambada"]
    # lm_eval answers for the members of a tag, not for the tag: a record of nothing is refused
    with pytest.raises(RuntimeError, match="no result for neox_tiny_tasks"):
        harness.per_task({"results": {TASK: {"acc,none": 0.5}}}, ["neox_tiny_tasks"])


@pytest.mark.slow
def test_a_failing_checkpoint_is_one_line_and_the_watch_goes_on(trained_run, tmp_path):
    """The shared runs record no tokenizer (synthetic tokens): each checkpoint fails, with one
    line, nothing is stored, and --once ends with status 1 after trying every one."""
    run_dir = trained_run(0, 1, "no")
    proc = neox_eval(["--watch", run_dir / "ckpt", "--once", "--tasks", TASK, "--include-path",
                      TASKS, "--json"], eval_env(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [x for x in proc.stderr.splitlines() if ": failed (" in x]
    assert [x.split(":")[1].strip() for x in failed] == ["global_step4", "global_step8"]
    assert "the run recorded no tokenizer, which lm-eval needs: pass --tokenizer FILE" in failed[0]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["evaluated"] == [] and sorted(summary["failed"]) == ["global_step4",
                                                                        "global_step8"]
    assert not (run_dir / "ckpt" / "eval").exists()


def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, capfd, monkeypatch):
    from neox_train.cli import eval as cli_eval
    from neox_train.track import trackers

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name: None if name == "mlflow" else real(name))
    code = cli_eval.main([str(tmp_path), "--report-to", "tensorboard,mlflow", "--tasks", TASK,
                          "--include-path", str(TASKS)])
    err = capfd.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "neox-eval: error: --report-to names mlflow, but the mlflow package is not installed: "
        "pip install 'neox-train[mlflow]' (or drop mlflow from --report-to)")


@pytest.mark.slow
def test_bad_input_is_one_line(trained_run, tmp_path):
    run_dir = trained_run(0, 1, "no")
    env = eval_env(tmp_path)

    def error(*args) -> str:
        proc = neox_eval(list(args), env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [x for x in proc.stderr.splitlines() if x.startswith("neox-eval: ")]
        assert lines, proc.stderr[-3000:]
        return lines[-1]

    assert "unknown lm-eval task(s): no_such_task (valid: a task, group or tag name" in error(
        run_dir / "ckpt", "--tasks", f"{TASK},no_such_task", "--include-path", TASKS)
    torn = tmp_path / "torn"
    (torn / "global_step2").mkdir(parents=True)
    assert "holds no complete checkpoint" in error(torn, "--tasks", TASK, "--include-path", TASKS)
    assert "does not exist" in error(tmp_path / "nowhere", "--tasks", TASK)
    assert "give a CHECKPOINT or --watch URL" in error()
    assert "--report-to 'comet' is not valid" in error(run_dir / "ckpt", "--report-to", "comet")
