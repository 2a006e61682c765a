"""The whole-set and from-disk forms of a weight update, on the engine's bucket protocol (begin, load, finish)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from colocate.model import LogprobProbe
from colocate.model.checkpoint import checkpoint_files, checkpoint_layout, read_safetensors


def update_whole(engine: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None,
                 partial: bool = False, verify: LogprobProbe | None = None) -> dict[str, Any]:
    """A whole set of (HF name, tensor) pairs in one update: plan, begin, one load, finish."""
    start = time.perf_counter()
    named = list(named_tensors)
    bad = [f"{n!r}: expected a torch.Tensor, got {type(t).__name__}" for n, t in named
           if not isinstance(t, torch.Tensor)]
    if bad:
        raise ValueError(f"refused weight update ({len(bad)} bad tensor(s), nothing was copied): {'; '.join(bad[:8])}")
    engine.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in named], version=version, partial=partial,
                               verify=verify)
    # Checked before the copy where the check runs at device speed (a refused set then changes nothing);
    # host tensors into a GPU engine are checked on the device after their copy instead.
    check_first = all(t.device.type == engine.config.torch_device.type for _, t in named)
    try:
        engine.load_weight_bucket(named, check_first=check_first)
    except BaseException:
        engine.abort_weight_update()
        raise
    result = engine.finish_weight_update()
    return result | {"bytes": sum(t.numel() * t.element_size() for _, t in named), "seconds": time.perf_counter() - start}


def update_from_disk(engine: Any, path: str, *, version: int | None, partial: bool = False) -> dict[str, Any]:
    """Load a safetensors folder into `engine` in place, one file per bucket (begin, load each file, finish).

    Every name, shape and dtype is checked from the file headers before the first copy.
    """
    start = time.perf_counter()
    files = checkpoint_files(path)
    layout = checkpoint_layout(files)
    if engine.model_config.tie_word_embeddings and any(n == "model.embed_tokens.weight" for n, _, _ in layout):
        layout = [entry for entry in layout if entry[0] != "lm_head.weight"]  # the same tensor, tied
    expected = {name for name, _, _ in layout}
    engine.begin_weight_update(layout, version=version, partial=partial)
    try:
        for file in files:
            engine.load_weight_bucket([(n, t) for n, t in read_safetensors(file).items() if n in expected],
                                      check_first=True)
    except BaseException:
        engine.abort_weight_update()
        raise
    return engine.finish_weight_update() | {"seconds": time.perf_counter() - start}
