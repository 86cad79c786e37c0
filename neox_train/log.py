"""The package logger (`neox_train`) and how each rank logs: INFO to stderr and training.log on rank
0, warnings elsewhere."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "neox_train"


log = logging.getLogger(LOGGER_NAME)


def setup_logging(log_dir: Path | None, *, rank: int) -> None:
    """Rank 0: INFO to stderr and (when log_dir is given) to log_dir/training.log. Other ranks:
    warnings only."""
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(
        fmt if rank == 0 else logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    log.addHandler(stream)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / "training.log")
        file.setFormatter(fmt)
        log.addHandler(file)
