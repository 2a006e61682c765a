"""Device memory around a measurement: giving cached memory back, the free-memory baseline, allocator segments."""

from __future__ import annotations

import gc

import torch


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_device(device: torch.device) -> None:
    """Collect garbage and give the device's cached blocks back, exported ones whose consumers closed included."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.ipc_collect()  # exported blocks whose consumers have closed go back to the allocator
        torch.cuda.empty_cache()


def baseline_free(device: torch.device, dtype: torch.dtype) -> int:
    """Free device bytes with the CUDA context, cuBLAS handle and workspace made: what the engine is measured from."""
    a = torch.randn(64, 64, device=device, dtype=dtype)
    (a @ a).sum().item()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def num_segments(device: torch.device) -> int:
    """cudaMalloc'd segments the caching allocator holds (0 off CUDA, or before CUDA starts)."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return 0
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0)
