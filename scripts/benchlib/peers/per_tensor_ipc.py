"""Per-tensor CUDA IPC: the engine child's update path with one bucket, one handle, per tensor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from benchlib.engine_internals import export_per_tensor
from benchlib.measure import first_and_steady_by_key, timed
from colocate.model import CausalLM

if TYPE_CHECKING:
    from colocate.server import EngineProcess


def update_once(engine: EngineProcess, trainer: CausalLM, *, version: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, Any]:
    """Every tensor allocated, filled and exported alone (timed), then one `update_weights_from_manifest` (timed)."""
    tensors = dict(trainer.hf_named_tensors())
    buckets = []

    def export() -> dict[str, Any]:
        manifest, made = export_per_tensor(tensors, dtype=dtype, device=device, version=version)
        buckets.extend(made)
        return manifest

    try:
        export_s, manifest = timed(export, device)
        call_s, result = timed(lambda: engine.update_weights_from_manifest(manifest), device)
    finally:
        for bucket in buckets:  # only after the child has copied and closed every handle
            bucket.release()
    return {"num_handles": len(buckets), "export_fill_s": export_s, "call_s": call_s, "total_s": export_s + call_s,
            "version": result["version"]}


def measure(engine: EngineProcess, trainer: CausalLM, *, repeats: int, versions: Iterator[int], dtype: torch.dtype,
            device: torch.device) -> dict[str, Any]:
    """`repeats` per-tensor updates of the trainer's weights; export+fill and the call apart, and their total."""
    runs = [update_once(engine, trainer, version=next(versions), dtype=dtype, device=device) for _ in range(repeats)]
    return {"runs": runs, "num_handles": runs[0]["num_handles"],
            **first_and_steady_by_key(runs, ("export_fill_s", "call_s", "total_s"))}
