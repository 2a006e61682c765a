"""The checksum a bucket carries from its producer: cheap to compute on the device, and changed by any torn,
truncated, flipped or misrouted copy.

checksum(bucket) = sum over its 16-bit words w[i] (unsigned) of w[i] * (2 i + 1), modulo 2**64, as a signed
int64. Each word is weighted by an odd number that depends on its position, so:
  - a flipped bit or byte changes the sum by (odd) * (a nonzero amount below 2**16): never 0 modulo 2**64;
  - two slices swapped (a misrouted copy) change it unless the slices are equal;
  - a truncated or torn bucket (a tail of zeros or stale bytes) changes it unless the lost bytes were equal.
Integer arithmetic only: the CPU (torch) and CUDA (Triton, one pass over the bucket at memory speed)
implementations give the same number bit for bit.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger("colocate.weight_sync")
_ROW_WORDS = 4096  # the torch path sums the words as a table of rows this wide


def bucket_checksum(buffer: torch.Tensor) -> int:
    """The checksum of a uint8 bucket buffer (its bytes, an even number: every slot dtype is 2 or 4 bytes)."""
    return int(checksum_tensor(buffer))


def warm_up(device: torch.device) -> None:
    """Build (and check) the CUDA kernel now, so that the first update does not pay for it (no-op on CPU)."""
    if device.type == "cuda":
        _triton_ok(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()))


def checksum_tensor(buffer: torch.Tensor) -> torch.Tensor:
    """`bucket_checksum` as a 0-d int64 tensor on the buffer's device, without waiting for it on CUDA: the
    reduction is queued on the current stream, behind whatever wrote or reads the buffer there."""
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1, f"{buffer.dtype=} {buffer.shape=}"
    assert buffer.numel() % 2 == 0, f"{buffer.numel()=} is odd"
    if not buffer.is_cuda:
        return torch.tensor(_checksum_numpy(buffer), dtype=torch.int64)
    if _triton_ok(buffer.device):
        return _checksum_triton(buffer)
    return _checksum_torch(buffer)


def _checksum_numpy(buffer: torch.Tensor) -> int:
    # The torch path's algebra with numpy's unsigned 64-bit sums, several times faster on a CPU; uint64
    # arithmetic wraps modulo 2**64 like the others.
    words = buffer.numpy().view(np.uint16)
    n, cols = words.size, _ROW_WORDS
    body = words[: n - n % cols].reshape(-1, cols)  # [R, C], no copy
    rows = body.sum(axis=1, dtype=np.uint64)
    columns = body.sum(axis=0, dtype=np.uint64)
    tail = words[n - n % cols:].astype(np.uint64)
    with np.errstate(over="ignore"):
        weighted = (np.uint64(cols) * (np.arange(rows.size, dtype=np.uint64) * rows).sum(dtype=np.uint64)
                    + (np.arange(cols, dtype=np.uint64) * columns).sum(dtype=np.uint64)
                    + ((np.arange(tail.size, dtype=np.uint64) + np.uint64(n - n % cols)) * tail).sum(dtype=np.uint64))
        total = int(np.uint64(2) * weighted + rows.sum(dtype=np.uint64) + tail.sum(dtype=np.uint64))
    return total - (1 << 64) if total >= 1 << 63 else total


def _checksum_torch(buffer: torch.Tensor) -> torch.Tensor:
    # sum_i w[i] (2i + 1) = 2 sum_i i w[i] + sum_i w[i], and with the words laid out as rows of C
    # (i = r C + c): sum_i i w[i] = C sum_r r rowsum[r] + sum_c c colsum[c]. Two reductions over the
    # words instead of an index tensor and a product as large as the bucket; int64 wraps like the kernel.
    words = buffer.view(torch.int16)
    n = words.numel()
    cols = _ROW_WORDS
    padded = torch.zeros(-(-n // cols) * cols, dtype=torch.int32, device=buffer.device)
    padded[:n] = words
    padded[:n] &= 0xFFFF  # the words as unsigned 16-bit values
    table = padded.view(-1, cols)  # [R, C]
    rows = table.sum(dim=1, dtype=torch.int64)  # [R]
    columns = table.sum(dim=0, dtype=torch.int64)  # [C]
    row_index = torch.arange(rows.numel(), dtype=torch.int64, device=buffer.device)
    col_index = torch.arange(cols, dtype=torch.int64, device=buffer.device)
    weighted = cols * (row_index * rows).sum() + (col_index * columns).sum()
    return 2 * weighted + rows.sum()


@functools.cache
def _triton_ok(device: torch.device) -> bool:
    """Whether the Triton kernel runs here and agrees with the torch reference (checked once per device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        sample = torch.randint(0, 256, (3 * _BLOCK * 2 + 46,), dtype=torch.uint8, device=device)
        if int(_checksum_triton(sample)) == int(_checksum_torch(sample)):
            return True
        log.warning("the Triton bucket checksum disagrees with the reference on %s; using torch ops", device)
    except Exception:  # noqa: BLE001 - any failure to build or run the kernel: the reference still works
        log.warning("the Triton bucket checksum failed on %s; using torch ops", device, exc_info=True)
    return False


_BLOCK = 4096  # words per program and loop step
_TILE = 256  # words whose position-weighted sum fits 32 bits (see the kernel)


def _checksum_triton(buffer: torch.Tensor) -> torch.Tensor:
    from colocate.weight_sync import _checksum_kernel

    words = buffer.view(torch.int16)
    n = words.numel()
    num_sms = torch.cuda.get_device_properties(buffer.device).multi_processor_count
    num_programs = max(1, min(-(-n // _BLOCK), 4 * num_sms))
    partial = torch.empty(num_programs, dtype=torch.int64, device=buffer.device)
    _checksum_kernel.checksum_kernel[(num_programs,)](words, partial, n, BLOCK=_BLOCK, TILE=_TILE)
    return partial.sum()
