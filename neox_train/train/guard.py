"""The loss-spike and NaN guard: a bad step's update is skipped on every rank; a streak of them
rolls the run back.

Each optimizer step, before DeepSpeed applies the update, the ranks agree on the step's loss (the
mean over every rank and micro-step; it rides on the per-step agreement the loop makes anyway). The
step is bad when
- the loss is not finite (NaN, inf), or
- the loss is above `loss_spike_factor` times the median of the last `loss_spike_window` accepted
  losses (checked once the window is full), or
- the gradient norm is not finite (DeepSpeed's ZeRO and bf16/fp16 optimizers skip those updates
  themselves; for plain fp32 ZeRO-0, where the gradients are whole on every rank, the guard checks
  the norm itself).
A bad step consumes its data but changes nothing: the base optimizer's step and the LR scheduler's
are skipped, the very semantics of DeepSpeed's own overflow skip, so the schedule follows the
updates applied. After `max_bad_steps` bad steps in a row the loop rolls back to the newest complete
checkpoint before the streak and goes on from the data position it had reached, so the windows
consumed since that checkpoint are skipped (PaLM's recipe), and saves that state at once: a resume
from there sees exactly the data the healed run saw.

The guard's own state (the window of losses, its counters) is saved in every checkpoint, so a
resumed run judges its next steps as the uninterrupted run would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from neox_train.errors import RunDiverged
from neox_train.log import log


@dataclass
class StepOutcome:
    """What the guard made of the step just taken (the loss is the mean over every rank; None: guard
    off)."""

    loss: float | None = None
    skipped: bool = False
    reason: str = ""


@dataclass
class Verdict:
    bad: bool
    reason: str = ""


class LossGuard:
    def __init__(self, run):
        self.enabled = run.loss_guard
        self.factor = run.loss_spike_factor
        self.window: deque[float] = deque(maxlen=run.loss_spike_window)
        self.max_bad_steps = run.max_bad_steps
        self.max_rollbacks = run.max_rollbacks
        self.streak = 0  # bad steps in a row
        self.streak_start: int | None = None  # the first step of the streak
        self.skipped_updates = 0
        self.rollbacks = 0
        self.skipped_samples = 0

    # -- judging -----------------------------------------------------------------------------------
    def judge(self, loss: float) -> Verdict:
        """Before the update: is this step's (global) loss bad?"""
        if not math.isfinite(loss):
            return Verdict(True, f"non-finite loss ({loss})")
        if self.factor and len(self.window) == self.window.maxlen:
            median = statistics.median(self.window)
            if loss > self.factor * median:
                return Verdict(True, f"loss {loss:.4f} above {self.factor:g}x the running median "
                                     f"{median:.4f} (last {len(self.window)} steps)")
        return Verdict(False)

    def record(self, step: int, loss: float, bad: bool) -> bool:
        """After the step: count it; True when the streak calls for a rollback."""
        if not bad:
            self.window.append(loss)
            self.streak, self.streak_start = 0, None
            return False
        self.skipped_updates += 1
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        return bool(self.max_bad_steps) and self.streak >= self.max_bad_steps

    def rolled_back(self, samples: int) -> None:
        self.rollbacks += 1
        self.skipped_samples += samples
        self.streak, self.streak_start = 0, None

    def counters(self) -> dict[str, int]:
        return {"skipped_updates": self.skipped_updates, "rollbacks": self.rollbacks,
                "skipped_samples": self.skipped_samples}

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), **self.counters()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.window.clear()
        self.window.extend(float(x) for x in state.get("window", []))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skipped_samples = int(state.get("skipped_samples", 0))


def roll_back(guard: LossGuard, *, step: int, reason: str, checkpoints, consumed_samples: int,
              metrics) -> None:
    """Weights, optimizer and LR schedule back to the newest complete checkpoint before the streak
    (on every rank); the data position stays where it is, so the windows consumed since are skipped,
    and the step counter goes on. RunDiverged when max_rollbacks are spent or no checkpoint lies
    before the streak."""
    first_bad = guard.streak_start
    what = f"step {step}: {guard.streak} bad steps in a row (from step {first_bad}; {reason})"
    if guard.rollbacks >= guard.max_rollbacks:
        raise RunDiverged(f"{what} after {guard.rollbacks} rollback(s), the most "
                          f"max_rollbacks={guard.max_rollbacks} allows; the run diverges: its "
                          f"checkpoints are kept in {checkpoints.save_dir}")
    loaded = checkpoints.load_newest_before(first_bad)
    if loaded is None:
        raise RunDiverged(f"{what} and no complete checkpoint before step {first_bad} in "
                          f"{checkpoints.save_dir} to roll back to "
                          f"(save_steps={checkpoints.plan.run.save_steps})")
    tag, state = loaded
    skipped_from, skipped_to = state.consumed_samples, consumed_samples
    guard.rolled_back(skipped_to - skipped_from)
    log.warning(
        "rollback %d: %d bad steps in a row (steps %d-%d; %s): weights, optimizer and LR schedule "
        "are back at %s; the data consumed since is skipped: samples [%d, %d) (%d sequences); "
        "training goes on at step %d",
        guard.rollbacks, step - first_bad + 1, first_bad, step, reason, tag, skipped_from,
        skipped_to, skipped_to - skipped_from, step)
    metrics.record(step, "guard", {**guard.counters(), "rollback_to_step": state.step,
                                   "skipped_from_sample": skipped_from,
                                   "skipped_to_sample": skipped_to})


class UpdateSwitch:
    """Skips the update of a step inside DeepSpeed's engine.step(): the base torch optimizer's step
    (under DeepSpeed's ZeRO / bf16 wrappers, which then copy back unchanged master weights) and the
    LR scheduler's step.

    `check_grads`: for an engine whose optimizer is the torch optimizer itself (fp32 ZeRO-0: whole,
    all-reduced gradients, the same on every rank), the switch also skips when their norm is not
    finite, which DeepSpeed's wrappers check for the other configurations."""

    def __init__(self, engine):
        self.skip = False
        self.reason = ""
        self.active = True  # the gradient check runs only while the guard is on
        base = engine.optimizer
        self.check_grads = (isinstance(base, torch.optim.Optimizer)
                            and not hasattr(base, "optimizer"))
        while not isinstance(base, torch.optim.Optimizer) and hasattr(base, "optimizer"):
            base = base.optimizer
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError("the loss guard cannot find the torch optimizer under "
                            f"{type(engine.optimizer).__name__}")
        self._base = base
        original = base.step

        def step(*args, **kwargs):
            if not self.skip and self.active and self.check_grads and not _finite_grad_norm(base):
                self.skip, self.reason = True, "non-finite gradient norm"
            if self.skip:
                return None
            return original(*args, **kwargs)

        base.step = step
        scheduler = engine.lr_scheduler
        if scheduler is not None:
            original_lr_step = scheduler.step

            def lr_step(*args, **kwargs):
                if self.skip:
                    return None
                return original_lr_step(*args, **kwargs)

            scheduler.step = lr_step


def _finite_grad_norm(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).item())
