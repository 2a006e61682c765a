"""Naive offload: `.cpu()` of each weight under its HF name, free, `.cuda()` of each back."""

from __future__ import annotations

import gc
from typing import Any

import torch

from benchlib.checks import fingerprint
from benchlib.device import empty_cache
from benchlib.measure import first_and_steady_by_key, timed
from colocate.model import build_model, init_random_weights, preset_config


def measure(model: str, *, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int,
            num_cycles: int) -> dict[str, Any]:
    """Per-tensor `.cpu()` (pageable) + free, then `.cuda()` of each back: what a framework without pools does."""
    module = build_model(preset_config(model), device=device, dtype=dtype, max_positions=max_positions)
    init_random_weights(module, seed=seed)
    # One allocation per HF tensor (fused qkv / gate_up split), as an HF-layout model holds them.
    tensors = {name: t.clone() for name, t in module.hf_named_tensors()}
    del module
    gc.collect()
    empty_cache(device)
    before = fingerprint(tensors.values())
    out: dict[str, Any] = {"num_tensors": len(tensors),
                           "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}

    def offload() -> dict[str, torch.Tensor]:
        host = {name: t.to("cpu", copy=True) for name, t in tensors.items()}  # = .cpu(), but copies on CPU too
        tensors.clear()
        empty_cache(device)  # give the memory back to the device, as a release does
        return host

    cycles = []
    for _ in range(num_cycles):
        offload_s, host = timed(offload, device)
        onload_s, back = timed(lambda: {name: t.to(device, copy=True) for name, t in host.items()}, device)
        tensors.update(back)
        del host
        cycles.append({"offload_s": offload_s, "onload_s": onload_s,
                       "is_equal": fingerprint(tensors.values()) == before})
    del tensors
    empty_cache(device)
    out["cycles"], out["summary"] = cycles, first_and_steady_by_key(cycles)
    return out
