"""colocate: an LLM inference engine and an RL trainer sharing one GPU."""

from colocate.engine import Engine, EngineConfig, GenerationOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "GenerationOutput", "SamplingParams", "__version__", "launch_engine"]


def launch_engine(config: EngineConfig, **kwargs: object) -> "EngineProcess":  # noqa: F821
    """Run an `Engine` in a child process; see `colocate.process.launch_engine`."""
    from colocate.process import launch_engine as _launch

    return _launch(config, **kwargs)
