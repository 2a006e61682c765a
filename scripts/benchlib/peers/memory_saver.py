"""torch_memory_saver: the weights in a CPU-backed region, a KV-sized tensor in another; pause and resume each."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import torch

from benchlib.checks import fingerprint
from benchlib.device import baseline_free
from benchlib.measure import first_and_steady_by_key, timed
from colocate.model import build_meta_model, init_random_weights, preset_config


def subprocess_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for the fresh interpreter this peer runs in (it swaps the CUDA allocator, so never in the bench's)."""
    env = dict(env)
    # torch_memory_saver refuses to start with expandable segments on.
    conf = [c for c in env.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",") if c and "expandable" not in c]
    env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(conf)
    # hook_mode "preload" (its default): allocations outside its regions stay ordinary cudaMalloc;
    # in "torch" mode freeing any tensor made outside a region aborts the process.
    try:
        from torch_memory_saver.utils import get_binary_path_from_package

        env["LD_PRELOAD"] = str(get_binary_path_from_package("torch_memory_saver_hook_mode_preload"))
    except Exception as exc:  # noqa: BLE001 - not installed, or no GPU runtime: the peer reports it
        env["TMS_PRELOAD_ERROR"] = repr(exc)
    return env


def measure(model: str, *, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int,
            num_cycles: int, kv_bytes: int) -> dict[str, Any]:
    """torch_memory_saver 0.0.10, in a process started with `subprocess_env`: pause kv + weights, resume both."""
    try:
        from torch_memory_saver import torch_memory_saver
    except ImportError as exc:
        return {"error": f"not installed: {exc}"}
    if os.environ.get("TMS_PRELOAD_ERROR"):
        return {"error": f"could not set LD_PRELOAD for torch_memory_saver: {os.environ['TMS_PRELOAD_ERROR']}"}
    torch_memory_saver.hook_mode = "preload"  # the parent set LD_PRELOAD to its hook library
    try:
        version = importlib.metadata.version("torch_memory_saver")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (no package metadata)"
    out: dict[str, Any] = {"version": version, "hook_mode": "preload", "kv_bytes": kv_bytes}
    # In hook_mode "torch" every allocation goes through torch_memory_saver, and freeing one made
    # outside a region aborts ("only support interesting region"): all work here runs in a region.
    scratch = lambda: torch_memory_saver.region(tag="scratch")  # noqa: E731
    with scratch():
        free_base = baseline_free(device, dtype)
    module = build_meta_model(preset_config(model), dtype=dtype, max_positions=max_positions)
    with torch_memory_saver.region(tag="weights", enable_cpu_backup=True):
        out["weights_alloc_s"], _ = timed(lambda: module.to_empty(device=device), device)
        module.reset_buffers()
        init_random_weights(module, seed=seed)
    try:  # pinned (cudaMallocHost) or mmap host shadows: what the weights' pause copies into
        out["cpu_backup_backend"] = torch_memory_saver._impl._binary_wrapper.cdll.tms_get_cpu_backup_backend().decode()
    except Exception as exc:  # noqa: BLE001 - private API; only informative
        out["cpu_backup_backend"] = f"unknown ({type(exc).__name__})"
    with torch_memory_saver.region(tag="kv_cache"):
        out["kv_alloc_s"], kv = timed(lambda: torch.empty(kv_bytes, dtype=torch.uint8, device=device), device)
    torch.cuda.empty_cache()
    out["footprint_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
    with scratch():
        before = fingerprint(module.parameters())
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in module.parameters())
    cycles = []
    for _ in range(num_cycles):
        m: dict[str, Any] = {}
        torch.cuda.empty_cache()  # our own cached temporaries (the fingerprint's) are not tms's leftover
        m["pause_kv_cache_s"], _ = timed(lambda: torch_memory_saver.pause("kv_cache"), device)
        m["pause_weights_s"], _ = timed(lambda: torch_memory_saver.pause("weights"), device)
        m["leftover_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
        m["resume_weights_s"], _ = timed(lambda: torch_memory_saver.resume("weights"), device)
        m["resume_kv_cache_s"], _ = timed(lambda: torch_memory_saver.resume("kv_cache"), device)
        m["pause_s"] = m["pause_kv_cache_s"] + m["pause_weights_s"]
        m["resume_s"] = m["resume_weights_s"] + m["resume_kv_cache_s"]
        with scratch():
            m["weights_equal"] = fingerprint(module.parameters()) == before
        cycles.append(m)
    del kv
    out["cycles"], out["summary"] = cycles, first_and_steady_by_key(cycles)
    return out
