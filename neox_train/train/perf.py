"""Performance accounting: peak FLOP/s per device, MFU and HFU, where a step's time goes, memory
high-water mark.

MFU (model FLOPs utilisation, PaLM's definition) divides the FLOPs the model needs per token
(Megatron's formula, `model.flops_per_token`) times tokens/s by the device's peak. HFU (hardware
FLOPs utilisation) also counts the forward that activation checkpointing runs a second time; without
recompute the two are equal.

The peak table holds dense (no sparsity) 16-bit tensor-core peaks from NVIDIA's data sheets. It is
used only for bf16/fp16 runs: an fp32 run's matmuls do not run at that rate, and a CPU has no figure
we could defend, so both report MFU as null unless `--peak-tflops` names the peak to divide by.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from neox_train.units import GIB

# (label, pattern over torch.cuda.get_device_name(), dense bf16 TFLOP/s: NVIDIA's datasheet figure
# without sparsity, i.e. half the "with sparsity" one, the mistake MFU tables keep making). First
# match wins, so variants with a different peak come before the generic name. Unlisted variants
# match nothing and report no MFU rather than a wrong one: H100 NVL and H200 NVL (the datasheet
# editions disagree: 1,979 and 1,671 TFLOP/s with sparsity), GH200, MIG slices.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H200 SXM", r"\bH200\b(?!.*\bNVL\b)", 989.0),
    ("H100 PCIe", r"\bH100\b.*\bPCIe\b", 756.0),
    ("H100 SXM", r"\bH100\b(?!.*\b(PCIe|NVL)\b)", 989.0),
    ("A100", r"\bA100\b", 312.0),
    ("RTX 4090", r"\bRTX 4090\b", 165.0),  # fp32 accumulation (330 is fp16 accumulation)
    ("L4", r"\bL4\b", 121.0),  # 242 with sparsity
)


@dataclass(frozen=True)
class Peak:
    """The peak MFU is measured against; `tflops` None means "no honest peak", `source` says why or
    where from."""

    tflops: float | None
    source: str


def lookup_peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(table label, dense bf16 TFLOP/s) for a CUDA device name, or None when the table does not
    know it.

    A MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") has a fraction of the GPU's peak: no table
    value fits it."""
    if re.search(r"\bMIG\b", device_name):
        return None
    for label, pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return label, tflops
    return None


def resolve_peak(device_name: str | None, precision: str,
                 override_tflops: float | None = None) -> Peak:
    """The peak for this run: the override, else the table for a 16-bit run on a known GPU, else
    none.

    `device_name` is None on CPU."""
    if override_tflops is not None:
        return Peak(float(override_tflops), f"--peak-tflops {override_tflops:g}")
    if device_name is None:
        return Peak(None,
                    "CPU: no peak FLOP/s to measure against (give --peak-tflops to report MFU)")
    if precision not in ("bf16", "fp16"):
        return Peak(
            None, f"{precision} run: the table holds 16-bit tensor-core peaks (give --peak-tflops)")
    found = lookup_peak_tflops(device_name)
    if found is None:
        return Peak(None, f"{device_name!r} is not in the peak table (give --peak-tflops)")
    label, tflops = found
    return Peak(tflops, f"{device_name} = {label}, dense {precision} {tflops:g} TFLOP/s")


@dataclass(frozen=True)
class FlopsAccounting:
    """Turns tokens/s (all devices) into per-device TFLOP/s, MFU and HFU."""

    model_flops_per_token: int  # Megatron's count, no recompute: what MFU uses
    hardware_flops_per_token: int  # including the activation-checkpointing recompute: what HFU uses
    num_devices: int
    peak: Peak

    def rates(self, tokens_per_s: float) -> dict[str, float | None]:
        per_device = tokens_per_s / self.num_devices
        model = per_device * self.model_flops_per_token / 1e12
        hardware = per_device * self.hardware_flops_per_token / 1e12
        peak = self.peak.tflops
        return {
            "tokens_per_s_per_gpu": per_device,
            "tflops_per_gpu": model,
            "hfu_tflops_per_gpu": hardware,
            "mfu": model / peak if peak else None,
            "hfu": hardware / peak if peak else None,
        }


PHASES = ("data_wait", "fwd_bwd", "optimizer")


class StepTimer:
    """Seconds spent in each phase of the loop, summed between two readings.

    `data_wait` is host time (the loop blocked on the loader: nothing else runs then). On CPU every
    phase is host time, since the work is synchronous. On CUDA the host runs ahead of the device, so
    `fwd_bwd` and `optimizer` are timed with CUDA events on the compute stream and resolved only
    when read, at a log point: the accounting never makes the host wait for the device between
    micro-steps.
    """

    def __init__(self, device: "torch.device"):
        self.cuda = device.type == "cuda"
        self._host = dict.fromkeys(PHASES, 0.0)
        self._pending: list[tuple[str, Any, Any]] = []  # (phase, start event, end event), CUDA only
        self._free_events: list[Any] = []
        self._device = device

    def _event(self) -> Any:
        event = (self._free_events.pop() if self._free_events
                 else torch.cuda.Event(enable_timing=True))
        event.record(torch.cuda.current_stream(self._device))
        return event

    def begin(self) -> Any:
        """A start mark for a device phase: a perf_counter reading on CPU, a recorded CUDA event on
        CUDA."""
        return self._event() if self.cuda else time.perf_counter()

    def end(self, phase: str, started: Any) -> None:
        if self.cuda:
            self._pending.append((phase, started, self._event()))
        else:
            self._host[phase] += time.perf_counter() - started

    def add_host(self, phase: str, seconds: float) -> None:
        self._host[phase] += seconds

    def read_and_reset(self) -> dict[str, float]:
        """Total seconds per phase since the last reading (waits for the last recorded CUDA event,
        if any)."""
        totals = dict(self._host)
        if self._pending:
            self._pending[-1][2].synchronize()
            for phase, start, end in self._pending:
                totals[phase] += start.elapsed_time(end) / 1000.0
                self._free_events += (start, end)
            self._pending.clear()
        self._host = dict.fromkeys(PHASES, 0.0)
        return totals

    def reset(self) -> None:
        for _, start, end in self._pending:
            self._free_events += (start, end)
        self._pending.clear()
        self._host = dict.fromkeys(PHASES, 0.0)


def breakdown(totals: dict[str, float], *, steps: int, step_time_s: float) -> dict[str, float]:
    """Per-optimizer-step seconds of each phase, `other_s` (the loop's own work: logging, loss
    bookkeeping), and data wait as a fraction of the step.

    On CUDA the phases come from two clocks (host for data wait, device for the rest), so `other_s`
    can be slightly negative when the host waited for data while the device was still busy."""
    steps = max(steps, 1)
    out = {f"{phase}_s": totals[phase] / steps for phase in PHASES}
    out["other_s"] = step_time_s - sum(out.values())
    out["data_wait_frac"] = out["data_wait_s"] / step_time_s if step_time_s > 0 else 0.0
    return out


def memory_high_water(device: "torch.device") -> dict[str, float]:
    """Peak memory so far: the process's resident set (always) and, on CUDA, the allocator's
    peak."""
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024)
    out = {"host_rss_peak_gib": rss / GIB}
    if device.type == "cuda":
        out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["gpu_mem_reserved_peak_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return out


def device_name(device: "torch.device") -> str | None:
    """torch's name for a CUDA device (what the peak table matches), None for anything else."""
    if device.type != "cuda":
        return None

    return torch.cuda.get_device_name(device)


def perf_text(v: dict[str, Any]) -> str:
    """The performance part of the log line: rate, FLOP/s, utilisation, where the step's time went,
    memory."""
    text = (f"{v['tokens_per_s']:.0f} tokens/s, {v['step_time_s']:.3f} s/step, "
            f"{v['tflops_per_gpu']:.3g} TFLOP/s/GPU")
    if v.get("mfu") is not None:
        text += f", MFU {100 * v['mfu']:.1f}%"
        if v["hfu"] != v["mfu"]:
            text += f" (HFU {100 * v['hfu']:.1f}%)"
    step = v["step_time_s"]
    if step > 0 and "data_wait_s" in v:
        text += (f" | data {100 * v['data_wait_s'] / step:.1f}%, fwd+bwd "
                 f"{100 * v['fwd_bwd_s'] / step:.0f}%, optimizer "
                 f"{100 * v['optimizer_s'] / step:.0f}%")
    if v.get("checkpoint_stall_s"):
        text += f", checkpoint stall {v['checkpoint_stall_s']:.2f} s"
    if "gpu_mem_peak_gib" in v:
        text += f" | peak GPU memory {v['gpu_mem_peak_gib']:.2f} GiB"
    else:
        text += f" | peak RSS {v['host_rss_peak_gib']:.2f} GiB"
    return text


def as_float(value: Any) -> float:
    """A number, a 0-d tensor (DeepSpeed's grad norm) or None (nan) as a float."""
    if value is None:
        return float("nan")
    return float(value.item() if hasattr(value, "item") else value)
