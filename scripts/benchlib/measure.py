"""Timing a call with the device synchronised, the host time of every call to a function, first vs steady."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
FirstSteady = dict[str, float | None]  # {"first": the first run's value, "steady": the median of the others}


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


def first_and_steady(values: Sequence[float]) -> FirstSteady:
    """The first value, and the median of the others (the only value if there is one)."""
    rest = values[1:] or values
    return {"first": values[0] if values else None, "steady": statistics.median(rest) if rest else None}


def first_and_steady_by_key(runs: Sequence[Mapping[str, Any]], keys: Iterable[str] | None = None,
                            ) -> dict[str, FirstSteady]:
    """`first_and_steady` of each of `keys` over the runs that recorded it; by default every number they recorded."""
    if keys is None:
        keys = dict.fromkeys(k for r in runs for k, v in r.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool))
    return {k: first_and_steady([r[k] for r in runs if k in r]) for k in keys}


class CallTimer:
    """Wraps `owner.name` while active and records the host time of every call (allocation calls here).

        with CallTimer(torch, "empty_like") as calls:
            model.to_empty(device="cuda")
        calls.summary()["num_calls"]  # one per tensor
    """

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name
        self.seconds: list[float] = []

    def __enter__(self) -> CallTimer:
        self.original = getattr(self.owner, self.name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        setattr(self.owner, self.name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.original)

    def summary(self) -> dict[str, float | int]:
        s = self.seconds
        return {"num_calls": len(s), "total_s": sum(s), "max_s": max(s, default=0.0),
                "first_call_s": s[0] if s else 0.0}
