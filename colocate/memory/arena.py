"""A host buffer, pinned on CUDA machines, allocated once and reused for every offload."""

from __future__ import annotations

import torch

from colocate.memory.host import pinned_empty


class HostArena:
    """Byte buffer on the host that offloads copy into; grows when asked for more, never shrinks.

    Pinning is slow (about 2.5 GB/s, so seconds for a large model) but makes copies run at
    full PCIe speed; the arena is pinned once and reused across cycles. `release()` gives the
    memory back for users who need host memory more than fast cycles.

    >>> arena = HostArena(pin=torch.cuda.is_available())
    >>> host = arena.reserve(nbytes)   # uint8 [nbytes], reused next time
    """

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self.num_allocations = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def reserve(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of at least `nbytes` (the front of the arena)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # drop the old one before pinning a larger one
            self.buffer = pinned_empty(nbytes, pin=self.pin)  # exact size: torch's pinned pool rounds to 2**k
            self.num_allocations += 1
        return self.buffer[:nbytes]

    def release(self) -> int:
        freed = self.nbytes
        self.buffer = None
        return freed
