"""Serving the engine to other processes: `launch_engine` (a child process) and, later, the HTTP server."""

from colocate.server.process import EngineProcess, EngineProcessError, launch_engine

__all__ = ["EngineProcess", "EngineProcessError", "launch_engine"]
