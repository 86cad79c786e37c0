"""The warmup-stable-decay LR schedule (lr_schedule: wsd), which DeepSpeed does not have: a
torch LambdaLR whose factor is a pure function of the optimizer step and the run's settings.

Because the factor depends only on the step, a resume is exact (the checkpoint restores the step
count, DeepSpeed saves and loads the scheduler's state) and a branch is free: resuming a checkpoint
from the stable phase with another max_steps and decay_steps decays from wherever it stands.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LambdaLR


def wsd_factor(step: int, *, warmup_num_steps: int, warmup_min_ratio: float, min_ratio: float,
               total_num_steps: int, decay_num_steps: int) -> float:
    """The LR at optimizer step `step` over the peak: linear warmup from warmup_min_ratio, the
    peak, then a linear decay over the last decay_num_steps to min_ratio at total_num_steps."""
    if step < warmup_num_steps:
        return warmup_min_ratio + (1.0 - warmup_min_ratio) * step / warmup_num_steps
    decay_from = total_num_steps - decay_num_steps
    if step <= decay_from:
        return 1.0
    left = max(0, total_num_steps - step) / decay_num_steps
    return min_ratio + (1.0 - min_ratio) * left


class WsdLR(LambdaLR):
    """LambdaLR whose state is data only: the loss guard's update switch wraps the scheduler's
    step() with a function of its own (train/guard.py), which LambdaLR.state_dict would otherwise
    put into the checkpoint (and pickle cannot)."""

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if not callable(v)}

    def refresh(self) -> None:
        """After a checkpoint is loaded: the rate of the restored step under THIS run's settings.
        The optimizer's state brings back the rate the saved run had set, which a branch with
        another max_steps or decay_steps must not use for its first step."""
        rates = [base * factor(self.last_epoch)
                 for base, factor in zip(self.base_lrs, self.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self._last_lr = rates


def wsd_scheduler(params: dict[str, Any]):
    """What deepspeed.initialize takes as lr_scheduler: a callable that builds the scheduler on the
    optimizer DeepSpeed made. The factor is a plain function on purpose: LambdaLR saves and restores
    the attributes of a factor object, so a resume would bring back the checkpoint's max_steps and
    decay_steps; for a function it saves nothing, and a resumed run (a branch) decays by its own."""
    settings = {k: params[k] for k in ("warmup_num_steps", "warmup_min_ratio", "min_ratio",
                                       "total_num_steps", "decay_num_steps")}

    def factor(step: int) -> float:
        return wsd_factor(step, **settings)

    return lambda optimizer: WsdLR(optimizer, factor)
