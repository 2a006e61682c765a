"""Does a release give memory back when the engine's buffers were cut from a segment another live tensor shares?

    python scripts/probe_fragmented_release.py            # CUDA only; about 30 s

The caching allocator serves a request from the smallest cached free block that fits, splitting it,
and `empty_cache` returns only segments with nothing live in them. So a process that once held a
large tensor and still holds a small one cut from the same segment (a trainer, a test) can hand
that segment's free space to the engine's weights or KV pool; releasing them then frees nothing the
driver can see. This probe builds that layout on purpose, then an engine inside it, and prints what
a release reports and what the driver sees, with the engine's buffers allocated as usual and in a
private pool (`torch.cuda.MemPool`, where this torch has it), the candidate fix.
"""

from __future__ import annotations

import gc
import json

import torch

from colocate import Engine, EngineConfig


def free_mib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**20


def trap(nbytes: int) -> torch.Tensor:
    """A segment of `nbytes` cached by the allocator with a small live tensor cut from its start."""
    big = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    del big  # the segment stays cached
    return torch.empty(32 << 20, dtype=torch.uint8, device="cuda")  # cut from that cached segment


def release_report(offload: float) -> dict[str, float]:
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_bytes=1 << 30, max_model_len=256, max_num_seqs=16,
                                 weights_offload=offload))
    try:
        before = free_mib()
        report = engine.release_memory(weights_to="cpu")
        gc.collect()
        torch.cuda.empty_cache()
        return {"offload": offload, "driver_freed_mib": free_mib() - before,
                **{f"report_{tag}_mib": r.device_bytes / 2**20 for tag, r in report.tags.items()}}
    finally:
        engine.shutdown()


def pool_frees(nbytes: int) -> dict[str, object]:
    """The candidate fix alone: a buffer in a private pool, then freed with its pool: does the driver get it?"""
    if not hasattr(torch.cuda, "MemPool") or not hasattr(torch.cuda, "use_mem_pool"):
        return {"skipped": "this torch has no torch.cuda.MemPool"}
    keeper = trap(4 << 30)
    before = free_mib()
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    taken = before - free_mib()
    del buffer, pool
    gc.collect()
    torch.cuda.empty_cache()
    out = {"taken_mib": taken, "given_back_mib": free_mib() - (before - taken)}
    del keeper
    return out


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    results = {"plain": [release_report(o) for o in (0.0, 0.5)]}
    keeper = trap(4 << 30)
    results["in_a_shared_segment"] = [release_report(o) for o in (0.0, 0.5)]
    del keeper
    torch.cuda.empty_cache()
    results["private_pool"] = pool_frees(1 << 30)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
