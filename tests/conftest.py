"""Shared test kit: a learnable token corpus, DeepSpeed JSONs derived from the shipped ones, and a
runner that starts `neox-train` for real (one process, or several through the real `deepspeed`
launcher on gloo)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sshd import ssh_cluster  # noqa: F401  (session fixture: one sshd shared by every multi-node test)
from syspkgs import system_tools  # noqa: F401  (session fixture: system tools a test needs, installed once)

REPO = Path(__file__).resolve().parent.parent
# The parts journal of gs:// uploads that name none (neox-sync, the storage tests): one per test
# process tree, never the user's ~/.cache (remote/composite.py default_journal_path).
os.environ.setdefault("NEOX_CACHE_DIR", tempfile.mkdtemp(prefix="neox-test-cache-"))
# W&B's service writes a debug log per process under its cache dir, and settings under its config
# dir: the test run's, never the user's ~/.cache/wandb and ~/.config/wandb.
for _name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ.setdefault(_name, os.path.join(os.environ["NEOX_CACHE_DIR"], _name.lower()))
BIN = Path(sys.executable).parent
VOCAB = 256


def markov_tokens(n: int, seed: int = 0) -> np.ndarray:
    """Tokens from a sparse random Markov chain (2 successors per token): a tiny model learns it in
    a few steps, so "the loss falls" is a real signal, not noise."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 2))
    out = np.empty(n, dtype=np.uint16)
    tok = 0
    choices = rng.integers(0, 2, size=n)
    for i in range(n):
        out[i] = tok
        tok = successors[tok, choices[i]]
    return out


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test session and shared by every pytest-xdist worker (the workers'
    temporary folders sit side by side under one session folder): the first worker to ask builds it
    under a lock, the others wait for it and reuse it. Without xdist, the session's own temporary
    folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when a build fails
        failed = root / f"shared-{name}.failed"
        if failed.is_file():  # another worker's build failed: fail at once, not build it again
            raise RuntimeError(f"building the shared {name} failed in another test: "
                               f"{failed.read_text()[-3000:]}")
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            try:
                build(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory) -> Path:
    """Nested shards, one of them .npz, ~40k tokens."""

    def build(root: Path) -> None:
        toks = markov_tokens(40_000)
        (root / "part1" / "deep").mkdir(parents=True)
        np.save(root / "part1" / "a.npy", toks[:15_000])
        np.savez(root / "part1" / "deep" / "b.npz", input_ids=toks[15_000:30_000].astype(np.uint32))
        np.save(root / "c.npy", toks[30_000:])

    return built_once(tmp_path_factory, "tokens", build)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """Shards + tokenizer.json + meta.json from the real `neox-data prepare` (a 300-token BPE:
    padded to 384): a run trained on it records a tokenizer, so its exports load in lm-eval."""
    from pydoc_data.topics import topics

    from neox_train.data.prepare import prepare

    def build(root: Path) -> None:
        docs = root / "docs.jsonl"
        docs.write_text(
            "".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:30]))
        prepare([str(docs)], root / "data", tokenizer_path=None, vocab_size=300)

    return built_once(tmp_path_factory, "prepared", build) / "data"


def test_ds_config(tmp_path: Path, stage: int, *, lr: float = 3e-3, **zero_overrides) -> Path:
    """The shipped zero<stage>.json with a learning rate a 2-layer model moves on in a few steps."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["zero_optimization"].update(zero_overrides)
    path = tmp_path / f"zero{stage}_test.json"
    path.write_text(json.dumps(cfg))
    return path


test_ds_config.__test__ = False  # a helper, not a test


def tiny_run_config(tmp_path: Path, data_dir: Path, **overrides) -> Path:
    values = dict(
        model="neox-tiny", seq_len=32, vocab_size=VOCAB, micro_batch=4, grad_accum=2,
        mixed_precision="no", max_steps=6, warmup_steps=1, save_steps=3, log_steps=1, eval_steps=3,
        eval_batches=2, keep_last_n=0, val_fraction=0.05, data_dir=str(data_dir),
        save_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"),
    )
    values.update(overrides)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    return path


# The training runs several test files share (test_train checks them, test_convert exports them):
# each (ZeRO stage, processes, precision) trains once per session, TRAINED_STEPS steps, saved at
# TRAINED_SAVE_AT and at the end. Every stage at 1 and 2 ranks, fp32 and bf16 both at every rank
# count.
TRAINED_STEPS, TRAINED_SAVE_AT = 8, 4
TRAINED_CASES = [(0, 1, "no"), (0, 2, "bf16"), (1, 1, "bf16"), (1, 2, "no"), (2, 1, "no"),
                 (2, 2, "bf16"), (3, 1, "bf16"), (3, 2, "no")]
_trained: dict[tuple[int, int, str], Path] = {}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, token_dir):
    """get(stage, nprocs, precision) -> the run folder (run.json, ckpt/, logs/) of a shared training
    run. Tests read these folders and copy what they change."""

    def train(tmp: Path, stage: int, nprocs: int, precision: str) -> None:
        run = tiny_run_config(
            tmp, token_dir, ds_config=str(test_ds_config(tmp, stage)), mixed_precision=precision,
            max_steps=TRAINED_STEPS, save_steps=TRAINED_SAVE_AT, eval_steps=TRAINED_SAVE_AT,
        )
        run_train(["--config", str(run)], nprocs=nprocs)

    def get(stage: int, nprocs: int, precision: str) -> Path:
        key = (stage, nprocs, precision)
        if key not in _trained:
            _trained[key] = built_once(tmp_path_factory,
                                       f"trained_zero{stage}_{nprocs}p_{precision}",
                                       lambda tmp: train(tmp, *key))
        return _trained[key]

    return get


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores: no oversubscription
    return env


def communicate_or_kill(p: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of a process started in its own group (start_new_session); past `timeout`
    the whole group is killed and the test fails with the stderr tail."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, stderr = p.communicate()
        raise AssertionError(
            f"{' '.join(map(str, p.args))} timed out after {timeout} s\n{stderr[-6000:]}") from None


def run_in_own_group(cmd: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None
                     ) -> subprocess.CompletedProcess:
    """Run cmd in its own process group, so a hung run's ranks die with the launcher instead of
    outliving the test: on timeout the whole group is killed and the test fails with the command's
    stderr tail."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=cwd, start_new_session=True) as p:
        stdout, stderr = communicate_or_kill(p, timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def run_train(args: list[str], *, nprocs: int = 1, timeout: int = 300, check: bool = True,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`neox-train ARGS`, or `deepspeed --num_gpus N neox-train ARGS` for several CPU ranks on
    localhost."""
    exe = str(BIN / "neox-train")
    if nprocs == 1:
        cmd = [exe, *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port",
               str(_free_port()), exe, *args]
    proc = run_in_own_group(cmd, env={**train_env(), **(extra_env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(log_dir: Path, kind: str = "train") -> dict[int, dict]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == kind}


def copy_checkpoint(src: Path, dst: Path, tag: str) -> None:
    """A save dir holding only `tag` (what a fresh machine resuming from it would see)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / tag, dst / tag)
    (dst / "latest").write_text(tag)


# after pytest-randomly's shuffle: the order within each group stays random
# A wrapper, outermost (conftest registers after the plugins): it sorts after pytest-randomly's
# shuffle, which is a tryfirst wrapper too, so the order within each group stays random.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The slow tests first: with pytest-xdist, a minute-long test handed out last keeps one worker
    busy while the others have finished. GPU tests are skipped without CUDA."""
    import torch

    result = yield
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    return result
