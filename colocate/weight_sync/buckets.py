"""Buckets: group named tensors into flat buffers, fill them (cast on the device), view them back by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from colocate.dtypes import DTYPES, dtype_name
from colocate.memory.layout import align, view_at
from colocate.weight_sync.checksum import checksum_tensor
from colocate.weight_sync.copy_check import gather_checksum
from colocate.weight_sync.manifest import MAX_NAME_CHARS, BucketLayout, TensorSlot
from colocate.weight_sync.strict_json import check_name

# One bucket's bound: large enough that per-bucket costs (a handle, a round trip) vanish next to the copy,
# small enough that two of them in flight (the sender double-buffers) are a small share of the device.
DEFAULT_BUCKET_BYTES = 512 << 20


def plan_buckets(named_shapes: Iterable[tuple[str, tuple[int, ...]]], *, dtype: torch.dtype,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[BucketLayout, ...]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (greedy; slots aligned to ALIGN_BYTES).

    A tensor larger than `bucket_bytes` gets a bucket of its own. Every slot has `dtype`: the
    producer casts into it (`fill_bucket`), so the engine receives its own dtype.
    """
    if type(bucket_bytes) is not int or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive number of bytes, got {bucket_bytes!r}")
    dtype_str = dtype_name(dtype)
    buckets = []
    slots: list[TensorSlot] = []
    end = 0
    seen = set()
    for name, shape in named_shapes:
        check_name(name, "name", max_chars=MAX_NAME_CHARS)
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}: every tensor of an update needs a unique name")
        seen.add(name)
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{name!r}: shape {tuple(shape)} must be a sequence of non-negative ints")
        slot = TensorSlot(name=name, shape=tuple(shape), dtype=dtype_str, offset=align(end))
        if slots and slot.offset + slot.nbytes > bucket_bytes:
            buckets.append(BucketLayout(nbytes=end, tensors=tuple(slots)))
            slots = []
            slot = TensorSlot(name=slot.name, shape=slot.shape, dtype=slot.dtype, offset=0)
        slots.append(slot)
        end = slot.offset + slot.nbytes
    if not slots:
        raise ValueError("plan_buckets needs at least one tensor")
    buckets.append(BucketLayout(nbytes=end, tensors=tuple(slots)))
    return tuple(buckets)


def fill_bucket(layout: BucketLayout, tensors: Mapping[str, torch.Tensor], buffer: torch.Tensor, *,
                wait: bool = True) -> None:
    """Copy each tensor of the layout into its slot of `buffer`, cast to the slot's dtype (any source device).

    Every name and shape is checked before the first copy, so a bad call leaves `buffer` unchanged.
    On CUDA this returns only once the bytes are in memory (see the comment at the end), unless `wait` is
    False: then the copies are queued on the current stream and the caller synchronises it before sending.
    """
    _copy_into([view for _, view in bucket_views(layout, buffer)], _sources(layout, tensors), buffer)
    if buffer.device.type == "cuda" and wait:
        # The IPC event in a CUDA handle was recorded when the bucket was exported, before this
        # fill, so it does not order the consumer after these copies; and the consumer runs in
        # another process, on its own streams. Wait here: "fill_bucket returned" then means the
        # bytes are visible to whoever opens the handle next.
        torch.cuda.current_stream(buffer.device).synchronize()


def _copy_into(views: list[torch.Tensor], sources: list[torch.Tensor], buffer: torch.Tensor) -> None:
    """Each source into its slot view, cast to the view's dtype; queued on the current stream."""
    with torch.no_grad():
        same = [(view, src) for view, src in zip(views, sources)
                if src.device.type == buffer.device.type or src.dtype == view.dtype]
        # A copy that changes both device and dtype casts on the source's side first: from a
        # trainer offloaded to host memory that is a slow CPU cast, then a pageable transfer
        # (10x slower than the PCIe floor, measured). Move the bytes as they are (pinned: at
        # full speed), then cast on the device; one tensor at a time bounds the extra memory.
        for view, src in zip(views, sources):
            if src.device.type != buffer.device.type and src.dtype != view.dtype:
                # Non-blocking only towards CUDA (stream-ordered); a copy to the host must be done before it is read.
                view.copy_(src.to(buffer.device, non_blocking=buffer.device.type == "cuda"))
        if same:
            # One multi-tensor launch instead of one copy per tensor: a bucket holds dozens.
            torch._foreach_copy_([view for view, _ in same], [src for _, src in same])


def fill_and_checksum(layout: BucketLayout, tensors: Mapping[str, torch.Tensor], buffer: torch.Tensor) -> int:
    """`fill_bucket`, then the checksum of `buffer[:layout.nbytes]` (weight_sync.checksum), whose reading is the
    one wait for both. On CUDA one pass over the bucket does both where every tensor is on its device,
    contiguous, with its slot's dtype or fp32 for a bf16 slot (`copy_check.gather_checksum`)."""
    views = [view for _, view in bucket_views(layout, buffer)]
    sources, region = _sources(layout, tensors), buffer[:layout.nbytes]
    with torch.no_grad():
        pending = gather_checksum(region, views, sources)
    if pending is None:  # the separate fill, then the checksum queued behind it
        _copy_into(views, sources, buffer)
        pending = checksum_tensor(region)
    return int(pending)


def _sources(layout: BucketLayout, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensor for each slot, checked by name and shape before anything is copied."""
    sources = []
    for slot in layout.tensors:
        source = tensors.get(slot.name)
        if not isinstance(source, torch.Tensor):
            raise ValueError(f"fill_bucket: no tensor named {slot.name!r} (the layout lists {len(layout.tensors)})")
        if tuple(source.shape) != slot.shape:
            raise ValueError(f"fill_bucket: {slot.name!r} has shape {tuple(source.shape)}, "
                             f"the layout says {slot.shape}")
        sources.append(source)
    return sources


def bucket_views(layout: BucketLayout, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, view of its slot with the slot's dtype and shape) for each slot, in layout order; no copy.

    The views alias `buffer`: they are valid only while the bucket stays open (shared memory or
    CUDA IPC mapping), so copy out of them before closing it.
    """
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
            or not buffer.is_contiguous():
        described = (f"{buffer.dtype} {tuple(buffer.shape)} contiguous={buffer.is_contiguous()}"
                     if isinstance(buffer, torch.Tensor) else type(buffer).__name__)
        raise ValueError(f"the bucket buffer must be a contiguous 1-D uint8 tensor, got {described}")
    if buffer.numel() < layout.nbytes:
        raise ValueError(f"the bucket buffer holds {buffer.numel()} bytes, the layout needs {layout.nbytes}")
    return [(slot.name, view_at(buffer, slot.offset, slot.shape, DTYPES[slot.dtype])) for slot in layout.tensors]
