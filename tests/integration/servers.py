"""Helpers for the server tests: an app on a loopback port around an engine here or in its child process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from colocate import Engine, EngineConfig, launch_engine
from colocate.process import EngineProcess
from colocate.server.app import create_app
from colocate.server.serve import ServerThread

MODES = ("in-process", "engine-process")
PROMPT = "Hello world"
GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


@dataclass
class Served:
    """A running server: its URL, the engine behind it, and the greedy tokens it gave when it started.

    >>> with serve(checkpoint, "engine-process") as served: ...
    """

    url: str
    engine: Engine | EngineProcess
    mode: str
    checkpoint: Path
    expected: list[int]
    version: int | None = None  # the weights' version after start-up or the last restore


    def client(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def restore(self) -> None:
        """Undo what a test did: no update open, every tag awake, the weights of `checkpoint` again."""
        with self.client() as client:
            client.post("/update_weights/abort")
        self.engine.resume_memory()
        if self.engine.memory_status()["num_missing_weights"] or tokens(self.url) != self.expected:
            self.engine.update_weights_from_disk(str(self.checkpoint))
        assert tokens(self.url) == self.expected
        self.version = self.engine.memory_status()["weights_version"]


@contextlib.contextmanager
def serve(checkpoint: Path, mode: str, *, paused_wait_s: float = 120.0, max_model_len: int = 2048,
          **app_kwargs: Any) -> Iterator[Served]:
    """A server around a fresh engine on `checkpoint` (in this process, or in a child for "engine-process")."""
    config = EngineConfig(model=str(checkpoint), device="cpu", max_model_len=max_model_len,
                          paused_wait_s=paused_wait_s)
    engine = launch_engine(config) if mode == "engine-process" else Engine(config)
    try:
        with ServerThread(create_app(engine, **app_kwargs)) as server:
            yield Served(server.url, engine, mode, checkpoint, tokens(server.url))
    finally:
        engine.shutdown()


def tokens(url: str, prompt: str = PROMPT) -> list[int]:
    r = httpx.post(f"{url}/generate", json={"text": prompt, "sampling_params": GREEDY}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def error_of(r: httpx.Response) -> dict[str, str]:
    """The error object of a refusal, checked for the one shape every error has and for leaked internals."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "type", "message"}, body
    error = body["error"]
    assert all(type(v) is str and v for v in error.values()), body
    assert "Traceback" not in error["message"] and 'File "' not in error["message"], body
    return error


def num_active(client: httpx.Client) -> int:
    """Sequences the engine is running, queued or holding (GET /memory)."""
    status = client.get("/memory").json()
    return status["num_running"] + status["num_waiting"]
