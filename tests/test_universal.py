"""Resume on another GPU count: a ZeRO-2 checkpoint saved by 2 ranks continues on 1 rank (and 1
-> 2) through an automatic DeepSpeed universal checkpoint, with the same model, optimizer state and
data position: the next losses match a run that never stopped (same global batch: accumulation
doubles when the ranks halve)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import (
    TRAINED_SAVE_AT,
    copy_checkpoint,
    read_metrics,
    run_train,
    test_ds_config,
    tiny_run_config,
)

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 6, 3


def _train(tmp: Path, token_dir: Path, *, nprocs: int, grad_accum: int,
           resume_from: Path | None = None, stage: int = 2, max_steps: int = STEPS,
           check: bool = True):
    tmp.mkdir(parents=True, exist_ok=True)
    # fp32 so the comparison is tight: with bf16 the reduction order (one rank vs two) moves the
    # loss in the 3rd digit.
    run = tiny_run_config(
        tmp, token_dir, ds_config=str(test_ds_config(tmp, stage)), grad_accum=grad_accum,
        max_steps=max_steps, save_steps=SAVE_AT, eval_steps=0,
    )
    args = ["--config", str(run)]
    if resume_from is not None:
        copy_checkpoint(resume_from, tmp / "ckpt", f"global_step{SAVE_AT}")
        args += ["--resume", "latest"]
    return run_train(args, nprocs=nprocs, timeout=400, check=check)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2ranks-to-1", "1rank-to-2"])
def test_resume_on_another_rank_count_continues_exactly(tmp_path, token_dir, before, after):
    # Global batch 4 x accumulation x ranks = 16 on both sides.
    straight = tmp_path / "straight"
    _train(straight, token_dir, nprocs=before, grad_accum=4 // before)
    resumed = tmp_path / "resumed"
    proc = _train(resumed, token_dir, nprocs=after, grad_accum=4 // after,
                  resume_from=straight / "ckpt")
    assert "converting global_step3 to a DeepSpeed universal checkpoint" in proc.stderr
    assert (f"saved at data-parallel size {before} with ZeRO-2, this run is {after} with ZeRO-2"
            in proc.stderr)

    expected, got = read_metrics(straight / "logs"), read_metrics(resumed / "logs")
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in got:
        assert got[step]["consumed_samples"] == expected[step]["consumed_samples"]
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=2e-4), step
        assert got[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-6)
    # The converted copy is gone once loaded; the new checkpoints are ordinary tags at the new size.
    ckpt = resumed / "ckpt"
    assert (not (ckpt / "global_step3_universal").exists()
            and not (ckpt / "latest_universal").exists())
    assert (ckpt / "latest").read_text().strip() == f"global_step{STEPS}"


def test_zero0_checkpoint_to_zero2_is_refused_withone_line(tmp_path, token_dir, trained_run):
    first = trained_run(0, 1, "no")  # the session's shared ZeRO-0 run, saved at TRAINED_SAVE_AT
    second = tmp_path / "second"
    second.mkdir()
    copy_checkpoint(first / "ckpt", second / "ckpt", f"global_step{TRAINED_SAVE_AT}")
    run = tiny_run_config(second, token_dir, ds_config=str(test_ds_config(second, 2)),
                          max_steps=STEPS)
    proc = run_train(["--config", str(run), "--resume", "latest"], timeout=400, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"neox-train: error: checkpoint global_step{TRAINED_SAVE_AT}: saved at data-parallel size "
        "1 with ZeRO-0")
    assert "ZeRO-0 checkpoint" in last
    assert (sorted(p.name for p in (second / "ckpt").iterdir())
            == [f"global_step{TRAINED_SAVE_AT}", "latest"])
