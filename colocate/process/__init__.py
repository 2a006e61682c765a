"""The engine in a child process: `launch_engine`, its handle, and the JSON service the child runs."""

from colocate.process.launch import EngineInternalError, EngineProcess, EngineProcessError, launch_engine

__all__ = ["EngineInternalError", "EngineProcess", "EngineProcessError", "launch_engine"]
