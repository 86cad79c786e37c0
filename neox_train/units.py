"""Units shared by every report: "GB" in names and output means GiB (2**30 bytes), the unit torch
and nvidia-smi report memory in."""

from __future__ import annotations

GIB = 2**30
MIB = 2**20


def human_bytes(n: float) -> str:
    """`18.4 GiB` / `1.6 MiB`: a size for a one-line message."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
