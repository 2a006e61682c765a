"""Producer side in one call: plan buckets for named tensors, fill and export each, and describe them in a manifest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from colocate.weight_sync.handles import ExportedBucket, allocate_bucket
from colocate.weight_sync.manifest import WeightManifest, fill_bucket, plan_buckets


def export_manifest(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                    dtype: torch.dtype, device: torch.device | str, bucket_bytes: int = 512 << 20,
                    version: int | None = None) -> tuple[WeightManifest, list[ExportedBucket]]:
    """A complete manifest (one handle per bucket) over freshly exported buckets cast to `dtype`.

    >>> manifest, buckets = export_manifest(model.named_parameters(), dtype=torch.bfloat16, device="cuda")
    >>> post("/update_weights", {"format": "ipc", "manifest": manifest.to_dict(), "version": 3})
    >>> for bucket in buckets: bucket.release()
    The caller keeps the buckets alive until the consumer has copied them (its answer), then
    releases them. Peak extra memory is every bucket at once. If a fill fails, the buckets
    already made are released before the error propagates.
    """
    named = dict(named_tensors)
    layouts = plan_buckets([(n, tuple(t.shape)) for n, t in named.items()], dtype=dtype, bucket_bytes=bucket_bytes)
    buckets: list[ExportedBucket] = []
    try:
        for layout in layouts:
            buckets.append(allocate_bucket(layout.nbytes, device))
            fill_bucket(layout, named, buckets[-1].buffer)
    except BaseException:
        for bucket in buckets:
            bucket.release()
        raise
    return WeightManifest(version=version, buckets=layouts, handles=tuple(b.handle for b in buckets)), buckets
