"""Helpers shared by the benchmark scripts: device timing, weight fingerprints, table cells, the JSON report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DeviceDtypeMixin:
    """The torch forms of a benchmark config's `device` and `dtype` strings.

        @dataclass(kw_only=True)
        class BenchConfig(DeviceDtypeMixin):
            device: str = "cuda"
            dtype: str = "bfloat16"

        BenchConfig(device="cpu").is_cuda  # False
    """

    device: str  # fields of the dataclass that mixes this in; not fields here, so its field order is its own
    dtype: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def sync(device: torch.device, *, can_init_cuda: bool = True) -> None:
    # can_init_cuda=False: never the first CUDA call of the process, so a cold measurement pays CUDA
    # initialisation inside the timed call rather than in the synchronisation before it.
    if device.type == "cuda" and (can_init_cuda or torch.cuda.is_initialized()):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device, *, can_init_cuda: bool = True) -> tuple[float, T]:
    """Wall seconds of `fn()` with this process's device synchronised before and after, and its result."""
    sync(device, can_init_cuda=can_init_cuda)
    start = time.perf_counter()
    result = fn()
    sync(device, can_init_cuda=can_init_cuda)
    return time.perf_counter() - start, result


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """Exact integer sum of the tensors' bytes read as int32: equal for bitwise-equal weights."""
    total = 0
    for t in tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        raw = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
        total += int(raw.sum(dtype=torch.int64))
    return total


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def write_json(report: dict[str, Any], *, out: str, name: str,
               default: Callable[[Any], Any] | None = str) -> Path:
    """Write `report` to `$OUT/name` when $OUT is set (results come back from there), else to `out`.

    `default` turns values JSON cannot hold into something it can; None makes them an error instead.
    """
    path = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=default))
    return path
