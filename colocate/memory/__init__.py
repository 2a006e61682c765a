"""Sleep/wake building blocks: tags and reports, the pinned host arena, flat parameter buffers, trainer offload."""

from colocate.memory.arena import HostArena
from colocate.memory.flat import FlatParameters, materialize_buffers
from colocate.memory.offload import TrainerOffload
from colocate.memory.state import TAGS, MemoryReport, TagReport, TagState, check_tags

__all__ = ["TAGS", "FlatParameters", "HostArena", "MemoryReport", "TagReport", "TagState", "TrainerOffload", "check_tags",
           "materialize_buffers"]
