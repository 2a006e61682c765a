"""Sleep/wake building blocks: tags and reports, the pinned host arena, flat layouts and parameter buffers."""

from colocate.memory.arena import HostArena
from colocate.memory.flat import FlatParameters, materialize_buffers
from colocate.memory.state import TAGS, MemoryReport, TagReport, TagState, check_tags

__all__ = ["TAGS", "FlatParameters", "HostArena", "MemoryReport", "TagReport", "TagState", "check_tags",
           "materialize_buffers"]


def __getattr__(name: str) -> object:
    # TrainerOffload moved to colocate.trainer in 0.2; this alias goes in 0.3. Imported lazily
    # by name, so the memory layer itself never depends on the trainer.
    if name == "TrainerOffload":
        import importlib
        import warnings

        warnings.warn("colocate.memory.TrainerOffload moved to colocate.trainer.TrainerOffload", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module("colocate.trainer.offload").TrainerOffload
    raise AttributeError(f"module 'colocate.memory' has no attribute {name!r}")
