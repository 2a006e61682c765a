"""colocate: an LLM inference engine and an RL trainer sharing one GPU."""

from colocate.engine import Engine, EngineConfig, GenerationOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "GenerationOutput", "SamplingParams", "__version__"]
