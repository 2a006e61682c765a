"""Activation offloading: what autograd saves for backward waits in pinned host memory, not on the device.

    >>> offload = ActivationOffload(model, device=torch.device("cuda"))
    >>> with offload:                      # forward: saved activations leave for the host on a side stream
    ...     loss = model(x).sum()
    >>> loss.backward()                    # backward: each comes back, the next one prefetched meanwhile
    >>> offload.stats                      # tensors and bytes offloaded in the last forward

Built on `torch.autograd.graph.saved_tensors_hooks`, so the module is never edited and activation
checkpointing composes with it (a checkpointed region saves only its inputs, which are offloaded the
same way). The model's own parameters are never offloaded (the weights a linear layer saves are
views of them; they stay on the device anyway), nor are tensors below `min_bytes`.

Ordering. A saved tensor is copied on a side stream that first waits for the compute stream, so the
copy reads finished values; the device tensor stays referenced until that copy is done (an event),
then its memory returns to the caching allocator. Backward unpacks in roughly reverse order of packing,
so unpacking tensor i also starts bringing tensor i - 1 back on the side stream; the compute stream
waits on that copy's event before using it. On a CPU device the same protocol runs with host copies
(it frees nothing there; the tests use it to check gradients are unchanged).

Host memory. One forward's saved tensors are cut, one after another, from pinned chunks of
`HostPool` (64 MiB, or one tensor's size where larger); the chunks go back to the pool when that
forward's graph is freed, and the next forward reuses them. The pool grows to the largest forward's
live set and is pinned once, at its exact size. (Pinned per tensor through torch, each tensor would
round up to a power of two and stay cached at that size: for an 8B model's minibatch, gigabytes.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from colocate.memory.host import pinned_empty

DEFAULT_MIN_BYTES = 1 << 20  # smaller tensors cost more in copy latency than they free
_PIECE_ALIGN = 512  # bytes: every piece of a chunk starts aligned for any dtype and for fast copies


class HostPool:
    """Pinned host chunks lent to one forward at a time (`lease`) and taken back when its lease is dropped."""

    CHUNK_BYTES = 64 << 20

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self.free: list[torch.Tensor] = []
        self.nbytes = 0  # pinned so far, lent or free

    def lease(self) -> _Lease:
        return _Lease(self)

    def chunk(self, nbytes: int) -> torch.Tensor:
        """The smallest free chunk of at least `nbytes`, else a new one of max(nbytes, CHUNK_BYTES)."""
        fitting = [c for c in self.free if c.numel() >= nbytes]
        if fitting:
            found = min(fitting, key=torch.Tensor.numel)
            self.free.remove(found)
            return found
        new = pinned_empty(max(nbytes, self.CHUNK_BYTES), pin=self.pin)
        self.nbytes += new.numel()
        return new

    def release(self) -> int:
        """Unpin the free chunks (those lent out stay with their forward); returns the bytes given back."""
        freed = sum(c.numel() for c in self.free)
        self.free, self.nbytes = [], self.nbytes - freed
        return freed


class _Lease:
    """The chunks one forward cut its saved tensors from; back to the pool when the forward's graph is gone."""

    def __init__(self, pool: HostPool) -> None:
        self.pool, self.chunks, self.offset = pool, [], 0

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory (uint8), valid as long as this lease."""
        size = -(-nbytes // _PIECE_ALIGN) * _PIECE_ALIGN
        if not self.chunks or self.offset + size > self.chunks[-1].numel():
            self.chunks.append(self.pool.chunk(size))
            self.offset = 0
        piece = self.chunks[-1][self.offset:self.offset + nbytes]
        self.offset += size
        return piece

    def __del__(self) -> None:
        # Copies into or out of these chunks ran on the offload's side stream, and the next forward's copies
        # into them queue behind those on the same stream: no wait needed here.
        self.pool.free.extend(self.chunks)


class _Forward(list):
    """The saved tensors of one forward (a list autograd's packed handles point into) and their lease."""

    def __init__(self, lease: _Lease) -> None:
        super().__init__()
        self.lease = lease


@dataclass
class _Saved:
    host: torch.Tensor
    shape: torch.Size
    copied: torch.cuda.Event | None  # host copy done (CUDA)
    device_tensor: torch.Tensor | None  # kept alive until `copied`
    back: torch.Tensor | None = None  # prefetched device copy
    back_ready: torch.cuda.Event | None = None
    used: bool = False  # unpacked by a backward already (not prefetched again)


@dataclass
class OffloadStats:
    tensors: int = 0
    bytes: int = 0
    kept: int = field(default=0)  # saved tensors left on the device (parameters, small ones)


class ActivationOffload:
    """Context manager: tensors saved for backward inside it are kept in host memory until backward needs them."""

    def __init__(self, module: nn.Module, *, device: torch.device, min_bytes: int = DEFAULT_MIN_BYTES,
                 prefetch: bool = True) -> None:
        if min_bytes < 0:
            raise ValueError(f"min_bytes={min_bytes} must be >= 0")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors report their index: compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.module, self.device, self.min_bytes, self.prefetch = module, device, min_bytes, prefetch
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.stats = OffloadStats()
        self.pool = HostPool(pin=self.is_cuda)
        self._saved: _Forward | None = None  # the current forward's, inside the context only
        self._params: set[int] = set()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def __enter__(self) -> ActivationOffload:
        self._params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        # A list per forward, referenced by what autograd keeps: a later forward never mixes with an earlier
        # graph, and the host copies go when the graph does.
        self._saved, self.stats = _Forward(self.pool.lease()), OffloadStats()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._saved = None  # what autograd keeps now holds it: its chunks go back to the pool with the graph

    # -- forward ------------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> object:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device != self.device or nbytes < self.min_bytes or tensor.layout is not torch.strided \
                or tensor.untyped_storage().data_ptr() in self._params:
            self.stats.kept += 1
            return tensor
        assert self._saved is not None, "saved outside the context"
        self._release_copied()
        host = self._saved.lease.take(nbytes).view(tensor.dtype).view(tensor.shape)
        copied = None
        if self.is_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
        else:
            host.copy_(tensor)
        self._saved.append(_Saved(host, tensor.shape, copied, tensor if self.is_cuda else None))
        self.stats.tensors += 1
        self.stats.bytes += nbytes
        return self._saved, len(self._saved) - 1

    def _release_copied(self) -> None:
        """Drop device tensors whose host copy has finished: their memory goes back to the allocator."""
        for saved in reversed(self._saved):
            if saved.device_tensor is None:
                break
            if saved.copied is not None and saved.copied.query():
                saved.device_tensor = None

    # -- backward -----------------------------------------------------------------------------
    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        saved_list, index = packed
        saved = saved_list[index]
        if self.prefetch and index > 0 and not saved_list[index - 1].used:
            self._bring_back(saved_list[index - 1])  # backward's next, most likely
        tensor = self._bring_back(saved)
        if saved.back_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(saved.back_ready)
        saved.back = saved.back_ready = None
        saved.used = True
        return tensor

    def _bring_back(self, saved: _Saved) -> torch.Tensor:
        if saved.back is not None:
            return saved.back
        if not self.is_cuda:
            saved.back = saved.host.clone()
            return saved.back
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(saved.copied)  # the host copy is complete before it is read back
            saved.back = saved.host.to(self.device, non_blocking=True)
            saved.back_ready = torch.cuda.Event()
            saved.back_ready.record(self.stream)
        saved.device_tensor = None
        # The tensor was made on the side stream; the compute stream will use it, so the allocator must not
        # hand its memory out again before the compute stream is done with it.
        saved.back.record_stream(torch.cuda.current_stream(self.device))
        return saved.back
