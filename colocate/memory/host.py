"""Page-locked host memory of the size asked for, not the next power of two.

torch's `pin_memory=True` takes pinned memory from a caching allocator that rounds every request up
to a power of two: a 3.1 GB engine's weights pin 4 GiB, a 15.2 GB one's 16 GiB, and an optimizer
state of 8B parameters kept per tensor pins about 10% more than it holds (the MLP weights' 112 MiB
become 128). For state that lives in host memory all run long, that is the difference between
fitting and not. `pinned_empty` maps anonymous pages of the exact size (rounded to a page) and
registers them with CUDA instead; the registration ends when the last tensor over them is gone.

    >>> host = pinned_empty((4096, 14336), torch.bfloat16)   # 112 MiB pinned, not 128
    >>> host.is_pinned()
    True

Small requests (below `EXACT_FROM_BYTES`) keep torch's allocator, whose reuse suits them, and so
does every request on a machine without CUDA (nothing to pin for).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Sequence

import torch

EXACT_FROM_BYTES = 8 << 20  # below this, rounding wastes little and torch's caching of pinned blocks helps


class _PinnedPages(mmap.mmap):
    """Anonymous pages registered with CUDA for as long as this object lives: every tensor made over it with
    `torch.frombuffer` keeps it alive, so the registration ends (and the pages are unmapped) after the last."""

    address = 0
    unregister: Callable[[int], object] | None = None

    def __del__(self) -> None:
        if self.address and self.unregister is not None:
            try:
                # A copy queued from these pages may still be running: let it finish before they go.
                if torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                self.unregister(self.address)
            except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already; the pages go anyway
                pass
            self.address = 0


def _cuda_register() -> tuple[Callable[[int, int], int], Callable[[int], object]]:
    cudart = torch.cuda.cudart()  # flag 1: portable, page-locked for every context of the process
    return (lambda address, nbytes: int(cudart.cudaHostRegister(address, nbytes, 1))), cudart.cudaHostUnregister


def pinned_empty(shape: int | Sequence[int], dtype: torch.dtype = torch.uint8, *, pin: bool = True,
                 register: Callable[[], tuple[Callable[[int, int], int], Callable[[int], object]]] | None = None,
                 ) -> torch.Tensor:
    """An uninitialised host tensor, page-locked where `pin` and CUDA is available, holding exactly its bytes.

    `register` (tests) supplies the (register(address, nbytes) -> error code, unregister(address)) pair;
    by default CUDA's `cudaHostRegister` / `cudaHostUnregister`. Raises torch.OutOfMemoryError, having
    kept nothing, if the pages cannot be locked.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if register is None:
        if not (pin and torch.cuda.is_available()) or nbytes < EXACT_FROM_BYTES:
            return torch.empty(shape, dtype=dtype, pin_memory=pin and torch.cuda.is_available())
        register = _cuda_register
    do_register, unregister = register()
    pages = _PinnedPages(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)  # like malloc: private anonymous pages
    flat = torch.frombuffer(pages, dtype=torch.uint8)
    error = do_register(flat.data_ptr(), len(pages))
    if error:
        del flat
        pages.close()
        raise torch.OutOfMemoryError(f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory (CUDA error "
                                     f"{error}); the machine's locked-memory limit or free memory is too low")
    pages.address, pages.unregister = flat.data_ptr(), unregister
    return flat[:nbytes].view(dtype).view(shape)


def resident_bytes() -> int | None:
    """This process's resident host memory now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
