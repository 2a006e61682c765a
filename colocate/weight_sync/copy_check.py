"""A bucket's copy and its checks in one pass: the receiver's copies, the checksum and the NaN/inf scan.

Copied, checksummed and scanned separately, a bucket is read three times and written once; the
unchecked copy reads it once. On CUDA `BucketCheck.copy_and_check` does all three in one Triton kernel
(`_copy_check_kernel`) that reads each word once, so the checks cost no extra memory traffic. It applies
where every tensor of the bucket is a contiguous bf16, fp16 or fp32 view of the bucket going to a
contiguous destination of the same dtype on the same device (the engine's own weights); anything else
(fp8 destinations, casts, host-resident layers) takes the separate copy and checks.

    >>> check = BucketCheck(bucket[:nbytes], expected_checksum, "bucket 3")
    >>> judge = check.copy_and_check(destinations, sources)   # None: not applicable, copy and call check()
    >>> bad = judge()     # after the kernel: ValueError if the checksum differs; indices of non-finite sources
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from colocate.weight_sync import checksum
from colocate.weight_sync.checksum import _TILE, _checksum_torch, checksum_tensor

log = logging.getLogger("colocate.weight_sync")
_KINDS = {torch.bfloat16: 1, torch.float32: 2, torch.float16: 3}  # the kernel's finite-check codes
_CAST = 4  # a sender's fp32 tensor rounded into a bf16 slot
_BLOCK = 8192  # words per program


class BucketCheck:
    """The `after_copy` of a bucket carrying its producer's checksum (see `WeightTarget.load_weight_bucket`).

    Called, it queues the checksum of `source` (the bucket's bytes) behind the copies already issued
    and returns the check, which raises ValueError on a mismatch. `copy_and_check` does the copies
    and both checks in one pass where it applies: on the device types in `one_pass_devices` (a CPU
    copy is not memory-bound the same way; tests add "cpu" to run the kernel in Triton's interpreter).
    `COLOCATE_ONE_PASS_COPY=0` in the environment turns it off, for comparisons.
    """

    one_pass_devices: tuple[str, ...] = () if os.environ.get("COLOCATE_ONE_PASS_COPY") == "0" else ("cuda",)

    def __init__(self, source: torch.Tensor, expected: int, what: str) -> None:
        self.source, self.expected, self.what = source, expected, what

    def __call__(self) -> Callable[[], None]:
        pending = checksum_tensor(self.source)
        return lambda: self._compare(int(pending))

    def _compare(self, actual: int) -> None:
        if actual != self.expected:
            raise ValueError(f"{self.what} arrived corrupted (checksum {actual}, the producer's {self.expected}): the "
                             "update is refused and the engine refuses to generate until a complete update arrives")

    def copy_and_check(self, destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                       ) -> Callable[[], list[int]] | None:
        """Queue `destinations[i].copy_(sources[i])` for every i with the checksum and the scan, in one kernel.

        Returns None, having done nothing, where the one-pass kernel does not apply (see the module).
        Otherwise the returned judge waits for the kernel, raises ValueError if the checksum differs,
        and returns the indices of the sources that hold NaN or infinity.
        """
        if self.source.device.type not in self.one_pass_devices or not _kernel_ok(self.source.device):
            return None
        segments = plan_segments(self.source, sources, destinations)
        if segments is None:
            return None
        partial, bad, firsts = launch(self.source, segments, gather=False)
        totals = torch.stack([partial.sum(), bad.sum().to(torch.int64)])

        def judge() -> list[int]:
            checksum, num_bad = totals.tolist()
            self._compare(checksum)
            if not num_bad:
                return []
            return _flagged(bad, firsts, segments)
        return judge


def warm_up(device: torch.device) -> None:
    """Build (and check) the checksum kernel and the one-pass kernel now, so the first update does not pay for it."""
    checksum.warm_up(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # what a tensor's .device says
    if device.type in BucketCheck.one_pass_devices:
        _kernel_ok(device)


def gather_checksum(bucket: torch.Tensor, slots: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                    ) -> torch.Tensor | None:
    """A sender's fill and checksum in one pass: `slots[i]` (views into `bucket`) get `sources[i]` (an fp32
    source rounded into a bf16 slot), and the checksum of all of `bucket` comes back as a 0-d tensor, queued
    on the current stream. None, having done nothing, where the one pass does not apply."""
    if bucket.device.type not in BucketCheck.one_pass_devices or not _kernel_ok(bucket.device):
        return None
    segments = plan_segments(bucket, slots, sources, gather=True)
    if segments is None:
        return None
    return launch(bucket, segments, gather=True)[0].sum()


def plan_segments(bucket: torch.Tensor, slots: Sequence[torch.Tensor], others: Sequence[torch.Tensor], *,
                  gather: bool = False) -> np.ndarray | None:
    """The bucket cut into segments: [first word, words, address of the other side (0: a gap, checksummed
    only), kind, index into `slots` (-1 for a gap)], in order and covering every word; None where the kernel
    does not apply. `slots` are views into the bucket, `others` the tensors copied out of them (or, with
    `gather`, into them; then an fp32 tensor may fill a bf16 slot)."""
    base, device = bucket.data_ptr(), bucket.device
    rows = []
    for i, (slot, other) in enumerate(zip(slots, others)):
        kind = _KINDS.get(slot.dtype)
        if isinstance(other, torch.Tensor) and gather and (other.dtype, slot.dtype) == (torch.float32, torch.bfloat16):
            kind = _CAST
        elif not isinstance(other, torch.Tensor) or other.dtype != slot.dtype:
            kind = None
        if (kind is None or other.device != device or other.numel() != slot.numel() or not other.is_contiguous()
                or not slot.is_contiguous()):
            return None
        offset, nbytes = slot.data_ptr() - base, slot.numel() * slot.element_size()
        # fp32 values must start on 4 bytes, so that their upper halves are the odd words
        if offset < 0 or offset + nbytes > bucket.numel() or offset % slot.element_size() or other.data_ptr() % 2:
            return None
        if nbytes:
            rows.append((offset // 2, nbytes // 2, other.data_ptr(), kind, i))
    rows.sort()
    segments, position = [], 0
    for word, count, address, kind, index in rows:
        if word < position:
            return None  # two sources overlap
        if word > position:
            segments.append((position, word - position, 0, 0, -1))
        segments.append((word, count, address, kind, index))
        position = word + count
    if position < bucket.numel() // 2:
        segments.append((position, bucket.numel() // 2 - position, 0, 0, -1))
    return np.array(segments, dtype=np.int64).reshape(-1, 5)


def launch(bucket: torch.Tensor, segments: np.ndarray, *, gather: bool,
           ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Queue the kernel on the current stream: (per-program checksum parts, per-program non-finite counts,
    each segment's first program and the total). Runs wherever Triton does (its interpreter: CPU tensors)."""
    from colocate.weight_sync import _copy_check_kernel

    table, firsts = _device_table(segments, bucket.device)
    num_programs = int(firsts[-1])
    partial = torch.empty(max(num_programs, 1), dtype=torch.int64, device=bucket.device)
    bad = torch.zeros(max(num_programs, 1), dtype=torch.int32, device=bucket.device)
    if num_programs:
        # Steps of the binary search over segments; extra steps change nothing. Two values only, so the
        # kernels warm_up builds (8: up to 256 segments, every bucket we have seen) are the ones updates use.
        log2 = 8 if len(segments) <= 256 else 24
        _copy_check_kernel.copy_check_kernel[(num_programs,)](
            bucket.view(torch.int16), table, len(segments), partial, bad, GATHER=gather, LOG=log2, BLOCK=_BLOCK,
            TILE=_TILE, ALIGNED=aligned(bucket, segments))
    else:
        partial.zero_()
    return partial, bad, firsts


def aligned(bucket: torch.Tensor, segments: np.ndarray) -> bool:
    """Whether every segment starts and ends on a multiple of 8 words and every address is a multiple of 16 bytes
    (the bucket's too): then the kernel moves 16 bytes per access instead of 2, which is what reaches bandwidth.
    Weight buckets are laid out this way (slots on ALIGN_BYTES, tensors of even sizes); odd ones still work."""
    return (bucket.data_ptr() % 16 == 0 and not (segments[:, :2] % 8).any()
            and not (segments[:, 2] % 16).any())


_TABLES: dict[tuple[str, bytes], tuple[torch.Tensor, np.ndarray]] = {}
_TABLES_LOCK = threading.Lock()
_MAX_TABLES = 512  # a 70B model's buckets on both sides of an update, with room


def _device_table(segments: np.ndarray, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The kernel's table on `device` and each segment's first program, kept per layout: an update repeats the
    last one's buckets, and an upload per bucket would wait for the device (a pageable copy synchronises)."""
    key = (str(device), segments.tobytes())
    with _TABLES_LOCK:
        found = _TABLES.get(key)
    if found is None:
        blocks = -(-segments[:, 1] // _BLOCK)
        firsts = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)
        table = torch.from_numpy(np.concatenate([segments[:, :4].reshape(-1), firsts])).to(device)
        found = (table, firsts)
        with _TABLES_LOCK:
            if len(_TABLES) >= _MAX_TABLES:
                _TABLES.pop(next(iter(_TABLES)))
            _TABLES[key] = found
    return found


@functools.cache
def _kernel_ok(device: torch.device) -> bool:
    """Whether the one-pass kernel runs here and agrees with the separate copy, checksum and scan (once per device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        return self_check(device)
    except Exception:  # noqa: BLE001 - any failure to build or run the kernel: the separate path still works
        log.warning("the one-pass bucket copy failed on %s; copying and checking separately", device, exc_info=True)
    return False


def self_check(device: torch.device | str) -> bool:
    """Copy a bucket of random bytes holding bf16, fp32 and fp16 tensors (with a NaN and an infinity) out with the
    kernel and compare with torch: the bytes, the checksum and which tensors are non-finite; then fill one (an fp32
    tensor rounded into a bf16 slot too) and compare the bytes and checksum. Twice: a layout with gaps and odd
    lengths (the kernel's 2-byte accesses), and an aligned one (its 16-byte accesses, what weight buckets use)."""
    odd = (3 * _BLOCK * 2 + 1000, [(64, torch.bfloat16, 2 * _BLOCK + 3), (2 * 2 * _BLOCK + 100, torch.float32, 111),
                                   (2 * 2 * _BLOCK + 600, torch.float16, 90)])
    even = (3 * _BLOCK * 2 + 1024, [(0, torch.bfloat16, 2 * _BLOCK + 8), (2 * 2 * _BLOCK + 256, torch.float32, 120),
                                    (2 * 2 * _BLOCK + 768, torch.float16, 96)])
    ok = all(_self_check_layout(device, nbytes, specs) for nbytes, specs in (odd, even))
    if not ok:
        log.warning("the one-pass bucket copy disagrees with torch on %s; copying and checking separately", device)
    return ok


def _self_check_layout(device: torch.device | str, nbytes: int, specs: list[tuple[int, torch.dtype, int]]) -> bool:
    gen = torch.Generator().manual_seed(7)
    bucket = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    sources = _views_at(bucket, specs)
    for src in sources:
        src.copy_(torch.randn(src.numel(), generator=gen).to(src.dtype))
    sources[0][5], sources[1][7] = float("nan"), float("inf")
    bucket = bucket.to(device)
    sources = _views_at(bucket, specs)
    destinations = [torch.zeros_like(s) for s in sources]
    segments = plan_segments(bucket, sources, destinations)
    partial, bad, firsts = launch(bucket, segments, gather=False)
    ok = (int(partial.sum()) == int(_checksum_torch(bucket)) and _flagged(bad, firsts, segments) == [0, 1]
          and all(torch.equal(d.view(torch.int16), s.view(torch.int16)) for d, s in zip(destinations, sources)))
    # A sender's fill: an fp32 tensor rounded into the bf16 slot, the others as they are
    filled = bucket.clone()
    slots, reference = _views_at(filled, specs), filled.clone()
    sources = [torch.randn(slots[0].numel(), generator=gen).mul_(1e3).to(device),
               *(torch.randn(s.numel(), generator=gen).to(device, s.dtype) for s in slots[1:])]
    for slot, src in zip(_views_at(reference, specs), sources):
        slot.copy_(src)
    partial = launch(filled, plan_segments(filled, slots, sources, gather=True), gather=True)[0]
    return ok and torch.equal(filled, reference) and int(partial.sum()) == int(_checksum_torch(reference))


def _views_at(bucket: torch.Tensor, specs: list[tuple[int, torch.dtype, int]]) -> list[torch.Tensor]:
    return [bucket[o:o + n * torch.tensor([], dtype=d).element_size()].view(d) for o, d, n in specs]


def _flagged(bad: torch.Tensor, firsts: np.ndarray, segments: np.ndarray) -> list[int]:
    """The source indices of the segments whose programs counted a non-finite value."""
    per_segment = np.add.reduceat(bad.cpu().numpy(), firsts[:-1]) if len(firsts) > 1 else np.zeros(0)
    return sorted(int(segments[s, 4]) for s in np.flatnonzero(per_segment))
