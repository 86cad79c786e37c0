"""The loss's extra memory: forward + backward of the output layer and the cross-entropy, the whole
logits (`loss_chunk: 0`) against the chunked loss (neox_train/lm_loss.py), each in a process of its
own.

    .venv/bin/python bench/loss_memory.py [--micro-batch 4 --seq-len 2048 --vocab 50304
                                           --hidden 2048 --chunk 1024 --dtype fp32]

Each process allocates the final hidden states [micro x seq, hidden] and the output weight [vocab,
hidden] (both requiring gradients, as in training), reads its peak resident memory (VmHWM), runs
the loss forward and backward once, and reads it again: the difference is what the loss adds
(logits, their softmax, gradients, and the inputs' gradients, the same in both). The goal (issue
24): chunked at most 0.3 of the whole logits' extra. fp32 by default: this CPU runs bf16 matmuls
~17x slower (the GPU path is bf16; there the whole logits also keep a 16-bit copy, so the ratio is
lower still). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _harness
from _harness import median, run_in_scratch

GOAL = 0.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=1, help="processes per path (alternating)")
    p.add_argument("--child", choices=("whole", "chunked"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _hwm() -> int:
    """This process's peak resident set, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> dict:
    import torch

    from neox_train.lm_loss import linear_cross_entropy

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    tokens = args.micro_batch * args.seq_len
    hidden = torch.randn(tokens, args.hidden, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, dtype=dtype) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (tokens,))
    before = _hwm()
    started = time.perf_counter()
    if args.child == "whole":
        logits = hidden @ weight.t()
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        del logits
    else:
        loss = linear_cross_entropy(hidden, weight, targets, chunk=args.chunk)
    loss.backward()
    seconds = time.perf_counter() - started
    return {"extra_bytes": _hwm() - before, "inputs_bytes": before, "seconds": seconds,
            "loss": loss.item(), "grad_weight_norm": weight.grad.float().norm().item()}


def measure(args: argparse.Namespace) -> dict:
    results: dict[str, list[dict]] = {"whole": [], "chunked": []}
    for r in range(args.rounds):
        for path in (("whole", "chunked") if r % 2 == 0 else ("chunked", "whole")):
            argv = [a for a in sys.argv[1:] if not a.startswith("--child")]
            out = subprocess.run([sys.executable, __file__, *argv, "--child", path],
                                 capture_output=True, text=True, check=True)
            results[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
    whole = median(r["extra_bytes"] for r in results["whole"])
    chunked = median(r["extra_bytes"] for r in results["chunked"])
    gib = 2 ** 30
    w, c = results["whole"][0], results["chunked"][0]
    return {
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "vocab": args.vocab,
        "hidden": args.hidden, "chunk": args.chunk, "dtype": args.dtype,
        "logits_gib": args.micro_batch * args.seq_len * args.vocab * 4 / gib,
        "whole_extra_gib": whole / gib, "chunked_extra_gib": chunked / gib,
        "ratio": chunked / whole, "goal": GOAL, "goal_met": chunked / whole <= GOAL,
        "whole_seconds": median(r["seconds"] for r in results["whole"]),
        "chunked_seconds": median(r["seconds"] for r in results["chunked"]),
        "loss_whole": w["loss"], "loss_chunked": c["loss"],
        "grad_weight_norm_whole": w["grad_weight_norm"],
        "grad_weight_norm_chunked": c["grad_weight_norm"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        _harness._RESULT_OUT.write(json.dumps(child(args)) + "\n")  # the parent reads this line
        return 0
    return run_in_scratch("loss_memory", lambda tmp: measure(args))


if __name__ == "__main__":
    sys.exit(main())
