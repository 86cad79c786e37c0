"""`--profile-steps A-B` and `--memory-snapshot STEP`: what a run records for a person to look at
later, in LOG_DIR/profile/, per rank.

- The profile: torch.profiler over steps A..B (CPU activity, and CUDA kernels on a GPU), written as
  a Chrome trace (`trace-rank<R>-steps<A>-<B>.json`: chrome://tracing, ui.perfetto.dev) and as the
  TensorBoard profiler plugin's files (`tensorboard/rank<R>.*.pt.trace.json`: `tensorboard
  --logdir LOG_DIR/profile/tensorboard` with torch-tb-profiler). Outside the span nothing is
  recorded, so the other steps run at full speed.
- The memory snapshot (CUDA only): the caching allocator records every allocation with its stack
  from the start of training; at step STEP, and on an out-of-memory error before the run exits, the
  history is written as `memory-rank<R>-<when>.pickle` for pytorch.org/memory_viz.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from neox_train.config import RunConfig
from neox_train.config_rules import profile_span
from neox_train.log import log

# allocation events the memory history keeps (the newest; torch's own example uses 100,000)
MEMORY_HISTORY_ENTRIES = 100_000


class Profiling:
    """The trainer calls before_step(n) before step n, after_step(n) after it, out_of_memory(n) when
    step n ran out of device memory, and close() at the end."""

    def __init__(self, run: RunConfig, *, rank: int, cuda: bool):
        self.span = profile_span(run.profile_steps)
        self.folder = Path(run.log_dir) / "profile"
        self.rank, self.cuda = rank, cuda
        self._prof: profile | None = None
        self._first = 0
        # the step to write the allocator's history at; None while it is not being recorded
        self.snapshot_step = run.memory_snapshot
        if self.snapshot_step is not None and not cuda:
            if rank == 0:
                log.warning("--memory-snapshot records the CUDA caching allocator's history: "
                            "this run has no GPU, so there is nothing to record")
            self.snapshot_step = None
        if self.snapshot_step is not None:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    def before_step(self, step: int) -> None:
        if self.span is None or self._prof is not None or not self.span[0] <= step <= self.span[1]:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._first = step
        # a schedule that records every step of the span: it marks each as ProfilerStep#i, which the
        # TensorBoard plugin's step view needs
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                             schedule=schedule(wait=0, warmup=0, active=self.span[1] - step + 1,
                                               repeat=1))
        self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is not None:
            self._prof.step()
            if self.span is not None and step >= self.span[1]:
                self._finish(step)
        if step == self.snapshot_step:
            self._snapshot(f"step{step}")

    def out_of_memory(self, step: int) -> None:
        """Step `step` ran out of device memory: write what the allocator saw (the caller exits)."""
        if self.snapshot_step is not None:
            self._snapshot(f"oom-step{step}")

    def close(self, step: int) -> None:
        """The run ended inside the span (max_steps, a stop signal): write what was recorded."""
        if self._prof is not None:
            self._finish(step)
        if self.snapshot_step is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot_step = None

    def _finish(self, last: int) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        chrome = self.folder / f"trace-rank{self.rank}-steps{self._first}-{last}.json"
        prof.export_chrome_trace(str(chrome))  # a profile is exported once
        # The TensorBoard plugin reads the same Chrome trace JSON, named as its
        # torch.profiler.tensorboard_trace_handler names it: a second name for the same file.
        board = self.folder / "tensorboard"
        board.mkdir(exist_ok=True)
        named = board / f"rank{self.rank}.{int(time.time() * 1000)}.pt.trace.json"
        try:
            os.link(chrome, named)
        except OSError:
            shutil.copyfile(chrome, named)
        log.info("profile of steps %d-%d written: %s (Chrome trace) and %s (TensorBoard)",
                 self._first, last, chrome, self.folder / "tensorboard")

    def _snapshot(self, when: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"memory-rank{self.rank}-{when}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        log.warning("memory snapshot written: %s (open it at pytorch.org/memory_viz)", path)
