"""A testing aid: faults injected into a real run through one environment variable, NEOX_FAULT.
Inert unless set.

    NEOX_FAULT="kill@step=7,rank=1"              rank 1 kills itself (SIGKILL) as step 7 begins
    NEOX_FAULT="hang@step=5,rank=0"              rank 0 stops making progress at step 5 (its
                                                 watchdog fires)
    NEOX_FAULT="crash@step=4"                    every rank raises an error at step 4
    NEOX_FAULT="nan@step=6"                      step 6's loss is NaN (so are its gradients)
    NEOX_FAULT="spike@step=10,count=3,factor=50" steps 10, 11, 12: the loss is 50 times larger
    NEOX_FAULT="slow@step=1,count=20,seconds=1"  steps 1-20 take a second longer (time for a kill
                                                 from outside)
    NEOX_FAULT="kill@step=3,attempt=0;hang@step=6,rank=1,attempt=1"   several, ';'-separated

`rank` (default: every rank) and `attempt` (default: every attempt; the supervisor numbers its
starts 0, 1, ...) narrow a fault down. The tests also kill and stop ranks from outside (kill -9,
SIGSTOP): this hook only makes a fault land at an exact step.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from neox_train import health
from neox_train.errors import ConfigError

ENV = "NEOX_FAULT"
KINDS = ("kill", "hang", "crash", "nan", "spike", "slow")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    attempt: int | None = None
    count: int = 1
    factor: float = 100.0
    seconds: float = 1.0

    def hits(self, step: int, rank: int, attempt: int) -> bool:
        return (self.step <= step < self.step + self.count
                and (self.rank is None or self.rank == rank)
                and (self.attempt is None or self.attempt == attempt))


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, rest = item.partition("@")
        fields: dict[str, str] = {}
        for pair in filter(None, rest.split(",")):
            key, sep, value = pair.partition("=")
            fields[key.strip()] = value.strip() if sep else ""
        valid = ("KIND@step=N[,rank=R][,attempt=A][,count=C][,factor=F][,seconds=S], KIND one of "
                 + ", ".join(KINDS))
        if kind not in KINDS or "step" not in fields or set(fields) - {
                "step", "rank", "attempt", "count", "factor", "seconds"}:
            raise ConfigError(f"{ENV}={text!r}: cannot read {item!r} (valid: {valid})")
        try:
            faults.append(Fault(kind, int(fields["step"]),
                                rank=int(fields["rank"]) if "rank" in fields else None,
                                attempt=int(fields["attempt"]) if "attempt" in fields else None,
                                count=int(fields.get("count", 1)),
                                factor=float(fields.get("factor", 100.0)),
                                seconds=float(fields.get("seconds", 1.0))))
        except ValueError:
            raise ConfigError(f"{ENV}={text!r}: {item!r} has a value that is not a number (valid: "
                              f"{valid})") from None
    return faults


class Faults:
    """The faults of this rank and attempt; every method is a no-op when NEOX_FAULT is unset."""

    def __init__(self, rank: int, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.rank = rank
        self.attempt = int(environ.get(health.ATTEMPT_ENV, "0") or 0)
        self.faults = parse(environ.get(ENV, ""))

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _hit(self, kinds: tuple[str, ...], step: int) -> Fault | None:
        return next((f for f in self.faults
                     if f.kind in kinds and f.hits(step, self.rank, self.attempt)), None)

    def before_step(self, step: int) -> None:
        """As optimizer step `step` begins."""
        slow = self._hit(("slow",), step)
        if slow is not None:
            time.sleep(slow.seconds)
        fault = self._hit(("kill", "hang", "crash"), step)
        if fault is None:
            return
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "crash":
            raise RuntimeError(f"{ENV}: injected crash at step {step} on rank {self.rank}")
        while True:  # hang: the main thread never comes back; the watchdog thread sees no step
            time.sleep(3600)

    def loss_factor(self, step: int) -> float | None:
        """What step `step`'s loss is multiplied by (None: untouched)."""
        fault = self._hit(("nan", "spike"), step)
        if fault is None:
            return None
        return float("nan") if fault.kind == "nan" else fault.factor
