"""Each GPU test module starts on a device with nothing cached by the modules before it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def device_memory_between_modules(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give back what earlier modules left in this process's caches, and say what the device has free.

    Engines and Ray workers of a later module size themselves from the device's free memory: blocks
    an earlier module left cached here, or CUDA IPC blocks in limbo, would shrink or break them.
    """
    if not torch.cuda.is_available():
        yield
        return
    _give_back()
    free, total = torch.cuda.mem_get_info()
    print(f"\n[{request.module.__name__}] device free {free / 2**30:.1f} of {total / 2**30:.1f} GiB", flush=True)
    yield
    _give_back()


def _give_back() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()
