"""Trackers (report_to): W&B offline run files read back with the SDK's records, a real `mlflow
server` on loopback read back through MlflowClient. The same tracker run across a kill -9 and a
resume on another world size, steps that only go forward, and a tracker that is down or stalled
never stopping or slowing the loop."""

from __future__ import annotations

import json
import logging
import time

import pytest

from neox_train.config import from_dict
from neox_train.errors import ConfigError
from neox_train.track import trackers as trackers_module
from neox_train.track.sender import Ledger, Point, TrackerThread
from neox_train.track.sinks import Target
from neox_train.track.trackers import Trackers, check_installed

from conftest import run_train, test_ds_config, tiny_run_config
from trackers import experiment_name, free_port, mlflow_server, wandb_runs  # noqa: F401


def done_summary(stderr: str) -> dict:
    line = [x for x in stderr.splitlines() if " INFO done: " in x][-1]
    return json.loads(line.split(" INFO done: ", 1)[1])


# -- configuration ---------------------------------------------------------------------------------
def test_report_to_is_validated_and_a_missing_extra_is_one_line(monkeypatch, tmp_path):
    assert from_dict({"report_to": " WandB, mlflow ,wandb"}).trackers() == ("wandb", "mlflow")
    assert from_dict({"report_to": "none"}).trackers() == ()
    for bad in ("comet", "", "none,wandb", 3):
        with pytest.raises(ConfigError, match="report_to=.* is not valid .*tensorboard, wandb, "
                                              "mlflow, or none"):
            from_dict({"report_to": bad})

    real = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError) as err:
        check_installed(("tensorboard", "wandb"))
    assert str(err.value) == ("report_to names wandb, but the wandb package is not installed: "
                              "pip install 'neox-train[wandb]' (or drop wandb from report_to)")
    check_installed(("tensorboard", "mlflow"))
    # a run start says so before it reads anything (the config's data_dir does not exist)
    from neox_train.train.session import start_session

    with pytest.raises(ConfigError, match=r"neox-train\[wandb\]"):
        start_session(from_dict({"report_to": "wandb", "data_dir": str(tmp_path / "none"),
                                 "log_dir": str(tmp_path / "logs")}))


# -- the sender: steps only go forward -------------------------------------------------------------
class Recorder:
    """A tracker run that keeps what it is sent (the sender's rules are what is tested here; the
    real trackers are below)."""

    def __init__(self, held: int | None = None, delay_s: float = 0.0):
        self.points: list[Point] = []
        self.held, self.delay_s = held, delay_s
        self.closed = None

    def last_step(self):
        return self.held

    def log(self, points):
        time.sleep(self.delay_s)
        self.points += points

    def close(self, *, failed):
        self.closed = "failed" if failed else "finished"


def _sent(sink: Recorder) -> list[tuple[int, tuple[str, ...]]]:
    return [(p.step, tuple(sorted(p.values))) for p in sink.points]


def test_no_step_is_sent_twice_after_a_resume(tmp_path):
    ledger = Ledger(tmp_path / "trackers" / "t.json", "run1")
    ledger.write(5)  # the previous process handed steps up to 5 to the tracker
    sink = Recorder(held=None)  # and the tracker cannot tell (W&B offline): the ledger stands in
    thread = TrackerThread("t", lambda: sink, ledger)
    thread.put(Point(3, 0.0, {"run/restarts": 1.0}, catch_up=True))  # about this start
    for step in (4, 5, 6, 7):  # a resume from step 3 trains 4 and 5 again
        thread.put(Point(step, 0.0, {"train/loss": 1.0}))
    thread.put(Point(6, 0.0, {"checkpoint/bytes": 9.0}))  # an async save's report, late
    thread.put(Point(7, 0.0, {"sync/pending": 0.0}))
    thread.put(Point(7, 0.0, {"sync/pending": 1.0}))  # the same step again: an update
    thread.put(Point(6, 0.0, {"train/loss": 2.0, "eval/loss": 1.0}))  # train/loss: behind
    thread.put(Point(6, 0.0, {"train/loss": 2.0}))  # behind its own newest step
    thread.put(Point(8, 0.0, {"train/loss": 2.0}))
    deadline = time.monotonic() + 10
    while thread.sent < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.put(Point(7, 0.0, {"checkpoint/bytes": 9.0}))  # late, alone in its send
    thread.finish()
    counts = thread.join(10)
    assert _sent(sink) == [(6, ("run/restarts",)), (6, ("train/loss",)), (7, ("train/loss",)),
                           (6, ("checkpoint/bytes",)), (7, ("sync/pending",)),
                           (7, ("sync/pending",)), (6, ("eval/loss",)),
                           (8, ("train/loss",)), (7, ("checkpoint/bytes",))]
    assert counts == {"sent": 9, "dropped": 0, "skipped": 3}
    assert sink.closed == "finished" and thread.pending == 0
    assert ledger.read() == 8  # a late point never lowers it
    assert Ledger(ledger.path, "another-run").read() is None  # a ledger is one run's

    # A tracker that can tell is believed over the ledger: step 5's send was cut off by a kill.
    ledger.write(5)
    exact = Recorder(held=4)
    thread = TrackerThread("t", lambda: exact, ledger)
    for step in (4, 5, 6):
        thread.put(Point(step, 0.0, {"train/loss": 1.0}))
    thread.finish()
    assert thread.join(10) == {"sent": 2, "dropped": 0, "skipped": 1}
    assert [p.step for p in exact.points] == [5, 6]


class Stuck(Recorder):
    """A tracker whose first send hangs until released."""

    def __init__(self):
        super().__init__()
        import threading

        self.inside, self.release = threading.Event(), threading.Event()

    def log(self, points):
        self.inside.set()
        self.release.wait(30)
        super().log(points)


def test_a_stuck_tracker_drops_points_and_never_blocks(tmp_path, caplog):
    sink = Stuck()
    thread = TrackerThread("stuck", lambda: sink, Ledger(tmp_path / "l.json", "r"), capacity=10)
    thread.put(Point(1, 0.0, {"train/loss": 1.0}))
    assert sink.inside.wait(10)  # its send of step 1 hangs
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        for step in range(2, 202):
            thread.put(Point(step, 0.0, {"train/loss": 1.0}))
    assert time.perf_counter() - started < 0.5  # 200 puts against a tracker that takes nothing
    thread.finish()
    counts = thread.join(0.2)  # the run ends; the tracker is still stuck
    # 10 queued (the capacity, step 1 among them), 191 dropped at once; at the end all but the
    # ones sent count as dropped
    assert counts == {"sent": 0, "dropped": 201, "skipped": 0}
    sink.release.set()
    time.sleep(0.2)
    assert sink.points == [] or [p.step for p in sink.points] == [1]  # nothing after abandonment
    assert thread.sent == 0 and thread.dropped == 201
    warnings = [r.message for r in caplog.records if "tracker stuck: dropping" in r.message]
    assert len(warnings) == 1 and "its queue is full" in warnings[0]


def test_a_stalled_mlflow_server_never_blocks_the_loop(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    project = experiment_name()
    trackers = Trackers(("mlflow",), Target("stall1", "stall", project, tmp_path), {"a": 1})
    thread = trackers.threads[0]
    trackers.log(1, {"train/loss": 1.0})
    deadline = time.monotonic() + 60
    while thread.sent == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread.sent == 1
    mlflow_server.pause()  # SIGSTOP: connections open, nothing answers
    try:
        started = time.perf_counter()
        for step in range(2, 5002):
            trackers.log(step, {"train/loss": float(step)})
        put_s = time.perf_counter() - started
        counts = trackers.close(timeout_s=1.0)["mlflow"]
    finally:
        mlflow_server.resume()
    assert put_s < 1.0, put_s  # 5000 log calls against a frozen server
    assert counts["sent"] == 1 and counts["dropped"] >= 5000 - 4096
    run = mlflow_server.runs(project)[0]
    assert run.data.params == {"a": "1"} and run.data.tags["neox_run_id"] == "stall1"


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_dead_tracker_costs_points_not_the_run(token_dir, tmp_path):
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 0)),
                          report_to="tensorboard,mlflow", max_steps=4, save_steps=4, eval_steps=0)
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_train(["--config", str(run)], extra_env={
        "MLFLOW_TRACKING_URI": dead, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    summary = done_summary(proc.stderr)
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").open()]
    assert summary["trackers"]["mlflow"] == {"sent": 0, "dropped": len(records), "skipped": 0}
    warnings = [x for x in proc.stderr.splitlines() if "tracker mlflow: dropping points" in x]
    assert len(warnings) == 1 and "it could not start" in warnings[0] and dead in warnings[0]
    assert (tmp_path / "ckpt" / "global_step4").is_dir()  # TensorBoard and the run went on


@pytest.mark.slow
def test_kill_9_and_a_resume_on_two_ranks_continue_the_same_tracker_runs(
        mlflow_server, token_dir, tmp_path):  # noqa: F811
    project = experiment_name()
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 1)),
                          report_to="tensorboard,wandb,mlflow", tracker_project=project,
                          max_steps=9, save_steps=3, eval_steps=3)
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    # Steps 1-5 slow, so both trackers have started and taken steps up to 4 at least (5 was logged
    # just before the kill); killed as step 6 begins.
    first = run_train(["--config", str(run)], check=False, extra_env={
        **env, "NEOX_FAULT": "slow@step=1,count=5,seconds=2;kill@step=6"})
    assert first.returncode == -9, first.stderr[-3000:]
    ledgers = {n: json.loads((tmp_path / "logs" / "trackers" / f"{n}.json").read_text())
               for n in ("mlflow", "wandb")}
    held, run_id = ledgers["mlflow"]["step"], ledgers["mlflow"]["run_id"]
    assert held in (4, 5) and ledgers["wandb"]["step"] in (4, 5)
    # From global_step3 on two ranks: steps 4 and 5 are trained again, those held not sent again.
    second = run_train(["--config", str(run), "--resume", "latest"], nprocs=2, extra_env=env)
    summary = done_summary(second.stderr)
    assert summary["start_step"] == 3 and summary["end_step"] == 9
    for name in ("wandb", "mlflow"):
        assert summary["trackers"][name]["dropped"] == 0
        assert summary["trackers"][name]["skipped"] >= 1  # step 4 at least, held by both

    runs = mlflow_server.runs(project)
    assert len(runs) == 1, [r.info.run_name for r in runs]  # the same MLflow run
    mlrun = runs[0]
    assert mlrun.data.tags["neox_run_id"] == run_id and mlrun.info.status == "FINISHED"
    loss = mlflow_server.history(mlrun.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 10))  # every step once, in order
    jsonl = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").open()]
    killed = [r for r in jsonl if r["kind"] == "train"][:5]  # the killed process's lines
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5]
    # steps 1-3 the first pass's; 4 and 5 from either pass (their send may have been cut off by
    # the kill): the same numbers, but for the order two ranks sum gradients in (a 0.1% change seen)
    first = {r["step"]: r["loss"] for r in killed}
    assert dict(loss[:3]) == {s: first[s] for s in (1, 2, 3)}
    assert dict(loss[:5]) == pytest.approx(first, rel=1e-2)
    params = mlrun.data.params
    assert params["run_config.max_steps"] == "9" and params["data_parallel_size"] == "1"
    assert params["run_id"] == run_id
    assert mlrun.data.tags["changed.data_parallel_size"] == "2"  # params are immutable in MLflow

    files = wandb_runs(tmp_path / "logs" / "wandb", run_id)
    assert len(files) == 2 and files[-1].complete
    # W&B keeps a killed process's newest rows in memory (its docs: kill -9 loses them); what
    # reached the files goes forward: no step twice, none going back
    steps = [row["_step"] for f in files for row in f.rows]
    assert steps == sorted(set(steps))
    assert [row["_step"] for row in files[-1].rows] == list(range(ledgers["wandb"]["step"] + 1,
                                                                  10))
    config = files[-1].config
    assert config["run_config"]["max_steps"] == 9 and config["data_parallel_size"] == 2
    assert config["ds_config"]["zero_optimization"]["stage"] == 1 and config["run_id"] == run_id
