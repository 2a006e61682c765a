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

import torch

log = logging.getLogger("colocate.weight_sync")
_CHUNK_WORDS = 1 << 24  # the torch path works in pieces so its temporaries stay small


def bucket_checksum(buffer: torch.Tensor) -> int:
    """The checksum of a uint8 bucket buffer (its bytes, an even number: every slot dtype is 2 or 4 bytes)."""
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1, f"{buffer.dtype=} {buffer.shape=}"
    assert buffer.numel() % 2 == 0, f"{buffer.numel()=} is odd"
    if buffer.is_cuda and _triton_ok(buffer.device):
        return _checksum_triton(buffer)
    return _checksum_torch(buffer)


def _checksum_torch(buffer: torch.Tensor) -> int:
    words = buffer.view(torch.int16)
    total = torch.zeros((), dtype=torch.int64, device=buffer.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start:start + _CHUNK_WORDS].to(torch.int64) & 0xFFFF
        weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=buffer.device) * 2 + 1
        total += (chunk * weights).sum()  # int64 arithmetic wraps modulo 2**64 on every device
    return int(total)


@functools.cache
def _triton_ok(device: torch.device) -> bool:
    """Whether the Triton kernel runs here and agrees with the torch reference (checked once per device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        sample = torch.randint(0, 256, (3 * _BLOCK * 2 + 46,), dtype=torch.uint8, device=device)
        if _checksum_triton(sample) == _checksum_torch(sample):
            return True
        log.warning("the Triton bucket checksum disagrees with the reference on %s; using torch ops", device)
    except Exception:  # noqa: BLE001 - any failure to build or run the kernel: the reference still works
        log.warning("the Triton bucket checksum failed on %s; using torch ops", device, exc_info=True)
    return False


_BLOCK = 4096  # words per program and loop step


def _checksum_triton(buffer: torch.Tensor) -> int:
    from colocate.weight_sync import _checksum_kernel

    words = buffer.view(torch.int16)
    n = words.numel()
    num_sms = torch.cuda.get_device_properties(buffer.device).multi_processor_count
    num_programs = max(1, min(-(-n // _BLOCK), 4 * num_sms))
    partial = torch.empty(num_programs, dtype=torch.int64, device=buffer.device)
    _checksum_kernel.checksum_kernel[(num_programs,)](words, partial, n, BLOCK=_BLOCK)
    return int(partial.sum())
