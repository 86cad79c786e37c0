"""Validation: the loss over the held-out windows, the same number of forwards on every rank."""

from __future__ import annotations

import math
from collections.abc import Callable

import deepspeed.comm as dist
import torch

from neox_train.data.mixture import MixtureSplit
from neox_train.data.windows import Split, eval_batches


def evaluate_split(engine, loss_of: Callable[[list[int]], torch.Tensor],
                   split: Split | MixtureSplit, **kw) -> dict[str, float]:
    """evaluate() over the split's validation windows; for a mixture, per dataset (`loss/NAME`) and
    overall (the mean over every validation sequence evaluated)."""
    if not isinstance(split, MixtureSplit):
        return evaluate(engine, loss_of, split.val, **kw)
    out: dict[str, float] = {}
    total = weighted = 0.0
    for part in split.parts:
        if not len(part.val):
            continue
        ev = evaluate(engine, loss_of, part.val, **kw)
        if ev:
            out[f"loss/{part.name}"] = ev["loss"]
            total += ev["sequences"]
            weighted += ev["loss"] * ev["sequences"]
    if not total:
        return {}
    loss = weighted / total
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sequences": int(total), **out}


@torch.no_grad()
def evaluate(engine, loss_of: Callable[[list[int]], torch.Tensor], val: range, *, micro_batch: int,
             dp_size: int, rank: int, max_batches: int) -> dict[str, float]:
    """{loss, perplexity, sequences} over up to `max_batches` micro-batches per rank ({} without
    windows). `loss_of(indices)`: the mean loss of those windows (the trainer's forward)."""
    engine.eval()
    kw = dict(micro_batch=micro_batch, dp_size=dp_size, max_batches=max_batches)
    mine = eval_batches(val, dp_rank=rank, **kw)
    # Every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively inside
    # forward). With a tiny validation split high ranks can get no batch: they run a weight-0
    # forward.
    n_forwards = len(eval_batches(val, dp_rank=0, **kw))
    sums = torch.zeros(2, device=engine.device, dtype=torch.float64)
    for i in range(n_forwards):
        indices = mine[i] if i < len(mine) else []
        loss = loss_of(indices or [val[0]])
        if indices:
            sums[0] += loss.double() * len(indices)
            sums[1] += len(indices)
    dist.all_reduce(sums)
    engine.train()
    if sums[1] == 0:
        return {}
    loss = (sums[0] / sums[1]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sequences": int(sums[1].item())}
