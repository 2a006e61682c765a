"""The engine in a child process: `launch_engine`, its handle, and the JSON service the child runs."""

from colocate.process.launch import EngineProcess, EngineProcessError, launch_engine

__all__ = ["EngineProcess", "EngineProcessError", "launch_engine"]
