"""`colocate serve`: build the engine (here or in a child process) and run the HTTP app on uvicorn."""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from colocate.engine import Engine, EngineConfig
from colocate.server.disk_roots import DiskRoots


@dataclass(kw_only=True)
class ServeConfig:
    """Where and how the server listens.

    >>> serve(EngineConfig(model="tiny"), ServeConfig(port=30000))
    >>> ServeConfig(host="0.0.0.0")                       # ValueError: needs api_key
    Binding anything but loopback needs `api_key`: /pause, /update_weights and /generate
    would otherwise be open to the network.
    """

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    engine_process: bool = False  # run the engine in a child process (launch_engine)
    max_body_bytes: int = 64 << 20
    log_level: str = "info"
    weights_dirs: tuple[str, ...] = ()  # folders disk weight updates may read from; none: refused over HTTP
    served_model_names: tuple[str, ...] = ()  # what the OpenAI routes answer to; none: the model's name

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535] (0: any free port)")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; give a non-empty key or none")
        if not is_loopback(self.host) and self.api_key is None:
            raise ValueError(f"refusing to bind {self.host!r} without an API key: /pause, /update_weights and "
                             "/generate would be open to anyone who can reach it. Pass --api-key KEY, or bind "
                             "127.0.0.1 (the default)")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} must be positive")
        self.weights_dirs = tuple(self.weights_dirs)
        DiskRoots(self.weights_dirs)  # ValueError now for a root that is not a folder
        self.served_model_names = tuple(self.served_model_names)
        if not all(name.strip() for name in self.served_model_names):
            raise ValueError("a served model name is empty; give non-empty names")

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other name or address counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(engine_config: EngineConfig, config: ServeConfig) -> None:
    """Start the engine, serve until interrupted (Ctrl-C, SIGTERM), then shut the engine down."""
    import uvicorn

    from colocate.server.app import create_app
    from colocate.process import launch_engine

    engine = launch_engine(engine_config) if config.engine_process else Engine(engine_config)
    print(startup_line(engine, config), file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again; turn that
    # into KeyboardInterrupt for both, so the engine (and its child process) is shut down too.
    is_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if is_main else None
    try:
        app = create_app(engine, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                         weights_dirs=config.weights_dirs, served_model_names=config.served_model_names)
        uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level)).run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
        if is_main:
            signal.signal(signal.SIGTERM, previous)


def startup_line(engine: Any, config: ServeConfig) -> str:
    """What a user needs first: the model, its dtype and device, the context and KV capacity, where, auth."""
    limits = engine.info if hasattr(engine, "info") else engine.limits()
    ec = engine.config
    names = ", ".join(config.served_model_names) if config.served_model_names else ec.model
    where = config.url if config.port else f"{config.host} on a free port (uvicorn's line below says which)"
    return (f"colocate: serving {ec.model} as {names!r} ({ec.dtype} on {ec.device}); max_model_len "
            f"{limits['max_model_len']} ({limits['max_model_len_reason']}); the KV cache holds "
            f"{limits['kv_cache_tokens']} tokens; {where}; API key {'on' if config.api_key else 'off'}; "
            "API docs at /docs")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class ServerThread:
    """A uvicorn server running in a background thread of this process (tests, notebooks, a Ray actor).

    >>> with ServerThread(create_app(engine)) as server:
    ...     httpx.get(f"{server.url}/health")
    """

    def __init__(self, app: object, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="colocate-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {host}:{port} (see the log above)")
            time.sleep(0.02)
        # port=0 binds any free port: read back the one the socket got.
        self.port: int = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
