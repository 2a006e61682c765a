"""The first `Module.to_empty` (or `FlatParameters.materialize`) of a fresh process against later ones."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import torch

from benchlib.device import empty_cache, num_segments
from benchlib.measure import CallTimer
from benchlib.measure import timed as _timed
from benchlib.report import Table, ms
from colocate.memory import FlatParameters, materialize_buffers  # the engine's flat layout: what is measured
from colocate.model import build_meta_model, preset_config

PATHS = ("to_empty", "flat")
# first = the first to_empty / materialize of the process; alloc = its torch.empty(_like) calls
# (count, total, the first call, the slowest); excess = first - later (median of the later ones).
TABLE = Table([("first use in a fresh process", "<20"), ("cuda.init", ">9"), ("empty(1)", ">8"), ("first", ">8"),
               ("alloc n/total/first/max", ">29"), ("mallocs", ">7"), ("excess", ">8"), ("later", ">7"),
               ("to meta", ">7")])
# Never the first CUDA call: a cold process pays CUDA initialisation inside the timed call.
timed = functools.partial(_timed, can_init_cuda=False)


def measure(model: str, *, path: str, is_cold: bool, device: torch.device, dtype: torch.dtype,
            max_positions: int, num_cycles: int) -> dict[str, Any]:
    """The first `to_empty` (or flat `materialize`) of this process versus later ones, split into parts.

    `is_cold`: no CUDA warm-up first, so the first call pays CUDA initialisation; run it in a fresh process.
    """
    assert path in PATHS, f"{path=}"
    cpu = torch.device("cpu")
    is_cuda = device.type == "cuda"
    out: dict[str, Any] = {"path": path, "is_cold": is_cold, "cuda_initialized_at_start": torch.cuda.is_initialized()}
    if is_cuda and not is_cold:
        # Timed by hand: a synchronize before them would itself create the CUDA context.
        start = time.perf_counter()
        torch.cuda.init()  # torch's lazy init: driver, runtime, allocator; the context may come later
        out["cuda_init_s"] = time.perf_counter() - start
        for key in ("first_empty_s", "second_empty_s"):  # the first creates the context if init did not
            start = time.perf_counter()
            torch.empty(1, device=device)
            torch.cuda.synchronize(device)
            out[key] = time.perf_counter() - start
    out["build_meta_s"], module = timed(lambda: build_meta_model(
        preset_config(model), dtype=dtype, max_positions=max_positions), cpu)
    segments = num_segments(device)
    if path == "to_empty":
        with CallTimer(torch, "empty_like") as calls:  # Module.to_empty calls torch.empty_like per tensor
            out["first_s"], _ = timed(lambda: module.to_empty(device=device), device)

        def to_meta() -> None:
            module.to("meta")
            empty_cache(device)

        def back() -> None:
            module.to_empty(device=device)
    else:
        out["flat_layout_s"], flat = timed(lambda: FlatParameters(module), cpu)
        with CallTimer(torch, "empty") as calls:  # FlatParameters.materialize: one torch.empty
            out["first_s"], _ = timed(lambda: flat.materialize(device), device)
        out["first_buffers_s"], _ = timed(lambda: materialize_buffers(module, device), device)

        def to_meta() -> None:
            flat.to_meta()
            empty_cache(device)

        def back() -> None:
            flat.materialize(device)
    out["first_alloc"] = calls.summary()
    out["first_num_segments"] = num_segments(device) - segments  # cudaMalloc calls
    out["cuda_initialized_by_first"] = is_cold and is_cuda
    cycles = []
    for _ in range(max(num_cycles - 1, 3)):
        to_meta_s, _ = timed(to_meta, device)
        back_s, _ = timed(back, device)
        cycles.append({"to_meta_s": to_meta_s, "later_s": back_s})
    out["cycles"] = cycles
    out["to_meta_s"] = statistics.median(c["to_meta_s"] for c in cycles)
    out["later_s"] = statistics.median(c["later_s"] for c in cycles)
    out["num_tensors"] = sum(1 for _ in module.parameters()) + sum(1 for _ in module.buffers())
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """`TABLE` after a blank line, a row per result of `measure` under its label; nothing if there are none."""
    if not results:
        return
    print("\n" + TABLE.header())
    for label, r in results.items():
        a = r["first_alloc"]
        print(TABLE.row([label, ms(r.get("cuda_init_s")), ms(r.get("first_empty_s")), ms(r["first_s"]),
                         f"{a['num_calls']}/{ms(a['total_s'])}/{ms(a['first_call_s'])}/{ms(a['max_s'])}",
                         str(r["first_num_segments"]), ms(r["first_s"] - r["later_s"]), ms(r["later_s"]),
                         ms(r["to_meta_s"])]))
