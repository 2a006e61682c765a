"""Serving the engine to other processes: `launch_engine` (a child process) and the HTTP server."""

from colocate.server.process import EngineProcess, EngineProcessError, launch_engine

__all__ = ["EngineProcess", "EngineProcessError", "create_app", "launch_engine"]


def create_app(*args: object, **kwargs: object) -> "FastAPI":  # noqa: F821
    """The FastAPI app around an Engine or EngineProcess (needs the `server` extra); see `colocate.server.app`."""
    from colocate.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)
