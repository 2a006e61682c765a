"""The parent's end of the engine process: start `python -m colocate.process.child`, send JSON calls, read answers."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import colocate
from colocate.process.wire import EngineProcessError, rebuild_error

log = logging.getLogger("colocate.process")


class ChildChannel:
    """A child process running the engine, and the socket its JSON calls and answers travel on.

    >>> channel = ChildChannel(config_json, start_timeout_s=900)   # the child's answer to start-up: `info`
    >>> call_id, future = channel.call_async("memory_status")
    >>> channel.wait(future)                                        # EngineProcessError if the child died
    One reader thread matches answers to calls (several threads may call at once) and hands partial
    answers of streamed calls to their callbacks; when the child exits, every pending call fails.
    """

    def __init__(self, config_json: str, *, start_timeout_s: float) -> None:
        parent_sock, child_sock = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "colocate.process.child", "--fd", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=_child_env())
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._streams: dict[int, Callable[[dict], None]] = {}  # call id -> what its partial answers go to
        self._next_id = 0
        self._closed = False
        self.dead_reason: str | None = None
        self._conn.send_bytes(config_json.encode())
        self.info = self._wait_ready(start_timeout_s)
        self._reader = threading.Thread(target=self._read_loop, name="colocate-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.1):
            if self._proc.poll() is not None:
                raise EngineProcessError(f"the engine process exited during start-up (exit code "
                                         f"{self._proc.returncode}); see its stderr above")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise EngineProcessError(f"the engine process did not start within {timeout_s} s")
        try:
            message = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as e:
            self._proc.wait(5)
            raise EngineProcessError(f"the engine process exited during start-up (exit code "
                                     f"{self._proc.returncode}); see its stderr above") from e
        if not message.get("ok"):
            self._proc.wait(5)
            raise rebuild_error(message["error"])
        return message["result"]

    def _read_loop(self) -> None:
        try:
            while True:
                message = json.loads(self._conn.recv_bytes())
                if "partial" in message:
                    self._deliver_partial(message["id"], message["partial"])
                    continue
                self._streams.pop(message["id"], None)
                future = self._pending.pop(message["id"], None)
                if future is None:
                    continue
                if message["ok"]:
                    future.set_result(message["result"])
                else:
                    future.set_exception(rebuild_error(message["error"]))
        except (EOFError, OSError):
            pass
        try:
            self._proc.wait(1)
        except subprocess.TimeoutExpired:
            pass
        self.dead_reason = (f"the engine process exited (exit code {self._proc.returncode})"
                             if not self._closed else "the engine process was shut down")
        for future in list(self._pending.values()):
            future.set_exception(EngineProcessError(self.dead_reason))
        self._pending.clear()
        self._streams.clear()

    def _deliver_partial(self, call_id: int, partial: dict) -> None:
        callback = self._streams.get(call_id)
        if callback is None:
            return
        try:
            callback(partial)
        except Exception:  # a caller's callback must not stop the reader
            log.exception("a streamed request's callback failed")

    def call(self, method: str, **args: Any) -> Any:
        return self.wait(self.call_async(method, **args)[1])

    def call_async(self, method: str, *, on_partial: Callable[[dict], None] | None = None,
                   **args: Any) -> tuple[int, Future]:
        """Send one call; (its id, a future for its answer). Several threads may call at once.

        `on_partial(dict)` gets the call's partial answers, on the reader thread, before the future resolves.
        """
        if self.dead_reason is not None:
            raise EngineProcessError(self.dead_reason)
        future: Future = Future()
        with self._send_lock:
            call_id = self._next_id
            self._next_id += 1
            self._pending[call_id] = future
            if on_partial is not None:
                self._streams[call_id] = on_partial
            try:
                self._conn.send_bytes(json.dumps({"id": call_id, "method": method, "args": args}).encode())
            except (OSError, ValueError) as e:
                self._pending.pop(call_id, None)
                self._streams.pop(call_id, None)
                raise EngineProcessError(f"cannot reach the engine process: {e}") from e
        return call_id, future

    def wait(self, future: Future) -> Any:
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if self._proc.poll() is not None and not future.done():
                    # The reader fails pending calls once it sees EOF; give it a moment.
                    self._reader.join(2)
                    if not future.done():
                        raise EngineProcessError(f"the engine process exited (exit code {self._proc.returncode})")

    @property
    def is_alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self, timeout_s: float) -> None:
        """Ask the child to shut down, wait for it (kill it past `timeout_s`); no process or socket remains."""
        if self._closed:
            return
        self._closed = True
        if self.is_alive and self.dead_reason is None:
            try:
                self.call("shutdown")
            except EngineProcessError:
                pass
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._conn.close()
        self._reader.join(5)


def _child_env() -> dict[str, str]:
    # The child must import the same colocate (and whatever the caller put on its path) without the
    # caller's main module: our package's folder first, then the caller's sys.path.
    paths = [str(Path(colocate.__file__).resolve().parent.parent)]
    paths += [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
