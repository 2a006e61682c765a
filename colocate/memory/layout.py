"""Tensors at aligned byte offsets of one flat uint8 buffer: the layout weights, trainer offload and buckets share."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Every offset is a multiple of this: a view at it is as aligned as a fresh allocation, for any dtype and any
# vectorised copy kernel.
ALIGN_BYTES = 256


def align(offset: int) -> int:
    """The first multiple of ALIGN_BYTES at or after `offset`."""
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def pack(specs: Iterable[tuple[Iterable[int], torch.dtype]]) -> tuple[list[int], int]:
    """Offsets for tensors of these (shape, dtype) placed in order, each aligned, and the buffer's total bytes.

    >>> offsets, nbytes = pack([((4, 4), torch.float32), ((3,), torch.bfloat16)])   # [0, 256], 262
    """
    offsets, end = [], 0
    for shape, dtype in specs:
        offsets.append(align(end))
        end = offsets[-1] + tensor_nbytes(shape, dtype)
    return offsets, end


def view_at(buffer: torch.Tensor, offset: int, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` and `dtype` at byte `offset` of a contiguous uint8 buffer: a view, no copy."""
    shape = tuple(shape)
    return buffer[offset: offset + tensor_nbytes(shape, dtype)].view(dtype).view(shape)


def views(buffer: torch.Tensor, specs: Iterable[tuple[Iterable[int], torch.dtype]], offsets: Iterable[int],
          ) -> list[torch.Tensor]:
    """One view per (shape, dtype) at its offset of `buffer` (device or host)."""
    return [view_at(buffer, offset, shape, dtype) for (shape, dtype), offset in zip(specs, offsets)]
