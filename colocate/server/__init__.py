"""The HTTP server: `create_app` around an Engine or an EngineProcess, and `colocate serve`."""

from colocate.process import EngineProcess, EngineProcessError, launch_engine

__all__ = ["EngineProcess", "EngineProcessError", "create_app", "launch_engine"]


def create_app(*args: object, **kwargs: object) -> "FastAPI":  # noqa: F821
    """The FastAPI app around an Engine or EngineProcess (needs the `server` extra); see `colocate.server.app`."""
    from colocate.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)
