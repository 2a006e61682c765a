"""Every use of colocate's internals in the benches, in one place: each is to adapt if the engine changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from colocate import Engine
from colocate.weight_sync import ExportedBucket, export_manifest


def engine_host_weights(engine: Engine) -> list[tuple[str, torch.Tensor]]:
    """Every weight under its HF name, as views of one (pinned) host copy of the engine's flat buffer."""
    # internal: adapt if the engine changes (engine.memory.weights is the flat buffer, engine.runner.model its model)
    flat = engine.memory.weights
    host = torch.empty(flat.nbytes, dtype=torch.uint8, pin_memory=flat.buffer.is_cuda)
    host.copy_(flat.buffer)
    named = []
    for name, t in engine.runner.model.hf_named_tensors():
        assert t.is_contiguous(), f"{name=} {t.stride()=}"  # fused shards are dim-0 splits
        offset, nbytes = t.data_ptr() - flat.buffer.data_ptr(), t.numel() * t.element_size()
        named.append((name, host[offset: offset + nbytes].view(t.dtype).view(t.shape)))
    return named


def engine_has_cuda_graphs(engine: Engine) -> bool:
    """Whether the engine captured decode graphs (it does not on CPU, or with enable_cuda_graph=False)."""
    # internal: adapt if the engine changes (engine.runner.graphs)
    return engine.runner.graphs is not None


def host_arena_num_allocations(engine: Engine) -> int:
    """How many times the pinned host arena allocated: once per process, if later releases reuse it."""
    # internal: adapt if the engine changes (engine.memory.arena)
    return engine.memory.arena.num_allocations


def export_per_tensor(named_tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device,
                      version: int) -> tuple[dict[str, Any], list[ExportedBucket]]:
    """A manifest with one CUDA IPC bucket per tensor, each allocated, filled and exported; and the buckets.

    The caller releases the buckets once the consumer has copied them (its answer).
    """
    # internal: adapt if colocate.weight_sync changes (export_manifest with bucket_bytes=1 makes a bucket per
    # tensor; each fill synchronises, so the bytes are visible to the child)
    manifest, buckets = export_manifest(named_tensors, dtype=dtype, device=device, bucket_bytes=1, version=version)
    return manifest.to_dict(), buckets
