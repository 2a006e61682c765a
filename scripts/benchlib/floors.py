"""The floors a bench compares against, measured in the same run: PCIe (pinned host <-> device) and HBM copies."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

NEEDS_CUDA = "needs CUDA"
HBM_FLOOR_BYTES = 2 << 30
HBM_FORMULA = ("floor_s = 2 * weights_bytes / read_write_bytes_per_s; read_write_bytes_per_s = 2 * bytes / copy_s "
               "(a device-to-device copy of `bytes` reads and writes `bytes` each)")


def event_seconds(copy: Callable[[], None], device: torch.device, *, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `copy`, by CUDA events, after one warm-up call."""
    copy()
    torch.cuda.synchronize(device)
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        copy()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return seconds


def pcie_bandwidth(nbytes: int, device: torch.device, *, repeats: int) -> dict[str, Any]:
    """Pinned H2D and D2H: one copy of `nbytes` each way, median of `repeats`; floor_s = bytes / bytes_per_s."""
    if device.type != "cuda":
        return {"skipped": NEEDS_CUDA}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out: dict[str, Any] = {"bytes": nbytes}
    for direction, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        seconds = event_seconds(lambda: dst.copy_(src, non_blocking=True), device, repeats=repeats)
        out[f"{direction}_s"] = statistics.median(seconds)
        out[f"{direction}_bytes_per_s"] = nbytes / out[f"{direction}_s"]
    del host, dev
    torch.cuda.empty_cache()
    return out


def hbm_bandwidth(device: torch.device, *, repeats: int, nbytes: int = HBM_FLOOR_BYTES) -> dict[str, Any]:
    """Device-to-device copy of `nbytes` into a preallocated tensor (`clone` without the allocation), median."""
    if device.type != "cuda":
        return {"skipped": NEEDS_CUDA}
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    seconds = event_seconds(lambda: dst.copy_(src), device, repeats=repeats)
    del src, dst
    torch.cuda.empty_cache()
    copy_s = statistics.median(seconds)
    return {"bytes": nbytes, "copy_s": copy_s, "copy_s_all": seconds, "read_write_bytes_per_s": 2 * nbytes / copy_s,
            "formula": HBM_FORMULA}
