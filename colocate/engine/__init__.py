"""The built-in engine: paged KV cache, continuous batching, sampling, decode CUDA graphs."""

from colocate.engine.config import EngineConfig, SamplingParams
from colocate.engine.engine import Engine
from colocate.engine.sequence import GenerationOutput

__all__ = ["Engine", "EngineConfig", "GenerationOutput", "SamplingParams"]
