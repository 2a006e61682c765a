"""Device-memory primitives both sides share: copies on a side stream, giving cached memory back, free bytes."""

from __future__ import annotations

import torch


def free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device as the driver sees it (every process); 0 on CPU, which has no device pool."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device; on CPU, of host memory (available, total) from /proc/meminfo."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def give_back_cached(device: torch.device) -> None:
    """Return this process's cached-but-unused device memory to the driver, for other processes to use.

    cuBLAS keeps a workspace per handle and stream in the caching allocator (tens of MiB; capture streams
    too) that only an explicit clear frees; the next matmul makes it again.
    """
    if device.type != "cuda":
        return
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


def limit_device_memory(device: torch.device | str, nbytes: int | None) -> None:
    """Cap what this process's caching allocator may hold on a CUDA device at `nbytes` (an allocation past it
    raises torch.OutOfMemoryError); None lifts the cap. CPU has no device pool to cap: a no-op there."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if nbytes is None else min(1.0, nbytes / total), index)


def empty_own_segment(shape: int | tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str,
                      ) -> torch.Tensor:
    """torch.empty, in device memory no other tensor shares, so freeing it gives every byte back to the driver.

    The caching allocator cuts a request from the smallest cached free block that fits, and
    `empty_cache` returns only segments with nothing live in them. A process that held a large
    tensor and still holds a small one cut from the same segment (a trainer, an earlier step) would
    lend that segment's free part to an engine's weights or KV pool, and releasing them would then
    give nothing back. On CUDA the tensor is therefore cut from a private pool made for it alone;
    the pool is let go at once, so the segment goes back to the driver at the first `empty_cache`
    after the tensor is freed. On other devices (and torch without `MemPool`) this is torch.empty.
    """
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch.cuda, "use_mem_pool"):
        return torch.empty(shape, dtype=dtype, device=device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):  # a pool belongs to the device current when it is made and let go
        pool = torch.cuda.MemPool()
        with torch.cuda.use_mem_pool(pool, device=device):
            tensor = torch.empty(shape, dtype=dtype, device=device)
        del pool  # the segment now goes back at the first empty_cache after the tensor is freed
    return tensor


class SideStream:
    """Copies ordered after the work queued so far, run on a stream of their own so both copy engines stay busy.

    >>> side = SideStream(device)
    >>> side.copy(host, device_buffer, wait=True)    # a release: the copy must finish before the buffer is freed
    >>> side.copy(device_buffer, host, wait=False)   # a resume: later work on the current stream waits for it
    On CPU the copies are plain synchronous copies.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, dst: torch.Tensor | list[torch.Tensor], src: torch.Tensor | list[torch.Tensor], *,
             wait: bool) -> None:
        """dst.copy_(src) (or each pair of two lists) after everything already queued on the current stream.

        `wait=True` returns once the copies are done (the source may be freed: the allocator would
        hand its memory out again at once). `wait=False` makes the current stream wait for the
        copies instead, and records each `dst` on the side stream so it is not reused under them.
        """
        pairs = list(zip(dst, src)) if isinstance(dst, list) else [(dst, src)]
        if self.stream is None:
            for d, s in pairs:
                d.copy_(s)
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream), torch.no_grad():
            for d, s in pairs:
                d.copy_(s, non_blocking=True)
        if wait:
            self.stream.synchronize()
            return
        current.wait_stream(self.stream)
        for d, _ in pairs:
            if d.is_cuda:
                d.record_stream(self.stream)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
