"""Disk reload: save the trainer's weights as safetensors, then `update_weights_from_disk` in the engine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchlib.measure import first_and_steady_by_key, timed
from colocate.model import CausalLM, preset_config, save_checkpoint

if TYPE_CHECKING:
    from colocate.server import EngineProcess


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (longest mount-point prefix in /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best = ("", "unknown")
    for point, kind in mounts:
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > len(best[0]):
            best = (point, kind)
    return best[1]


def save_and_load(engine: EngineProcess, trainer: CausalLM, folder: Path, *, model: str, dtype: str,
                  device: torch.device, version: int) -> dict[str, Any]:
    """One round: save (device to host per tensor, then files) and load (read, validate, copy in place), each timed."""
    if folder.exists():
        shutil.rmtree(folder)
    config = preset_config(model).replace(torch_dtype=dtype)
    save_s, _ = timed(lambda: save_checkpoint(folder, config, trainer.hf_named_tensors()), device)
    load_s, result = timed(lambda: engine.update_weights_from_disk(str(folder), version=version), device)
    return {"save_s": save_s, "load_s": load_s, "total_s": save_s + load_s, "engine_seconds": result["seconds"],
            "file_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def measure(engine: EngineProcess, trainer: CausalLM, *, model: str, dtype: str, device: torch.device, tmp_dir: str,
            repeats: int, versions: Iterator[int], after_first: Callable[[], None]) -> dict[str, Any]:
    """`repeats` rounds in a folder under `tmp_dir`, deleted after; `after_first()` runs between the first and the rest.

    The page cache is warm for each load: the folder was just written.
    """
    folder = Path(tmp_dir) / f"bench_weight_sync-{os.getpid()}-{model}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    kind = fs_type(folder.parent)
    if kind in ("tmpfs", "ramfs"):
        print(f"  warning: --tmp-dir {folder.parent} is in memory ({kind}), which flatters the disk peer; "
              "pass a folder on local disk", flush=True)

    def round_() -> dict[str, Any]:
        return save_and_load(engine, trainer, folder, model=model, dtype=dtype, device=device, version=next(versions))

    try:
        runs = [round_()]
        after_first()
        runs += [round_() for _ in range(repeats - 1)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"runs": runs, "folder": str(folder.parent.resolve()), "fs_type": kind, "page_cache": "warm (just written)",
            **first_and_steady_by_key(runs, ("save_s", "load_s", "total_s"))}
