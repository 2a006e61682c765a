"""`launch_engine`: the Engine in a child process, driven by JSON messages on a socket, updated through IPC buckets."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import colocate
from colocate.engine import EngineConfig, GenerationOutput, SamplingParams
from colocate.engine.stream import StreamEvent
from colocate.memory.state import MemoryReport, TagState
from colocate.process.wire import (EngineInternalError, EngineProcessError, event_from_json, output_from_json,
                                   rebuild_error, report_from_json)
from colocate.weight_sync import BucketSender, device_for_uuid

__all__ = ["EngineInternalError", "EngineProcess", "EngineProcessError", "launch_engine"]

log = logging.getLogger("colocate.process")


def launch_engine(config: EngineConfig, *, start_timeout_s: float = 900.0) -> EngineProcess:
    """Start an `Engine` in a child process and return a handle with the same methods.

    >>> with launch_engine(EngineConfig(model="tiny", device="cpu")) as engine:
    ...     engine.generate(["Hello"], SamplingParams(max_new_tokens=8))
    ...     engine.update_weights(trainer.named_parameters(), version=1)  # CUDA IPC / shared memory buckets
    The child is a fresh `python -m colocate.process.child`: it never imports the caller's main
    module, so scripts without an `if __name__ == "__main__":` guard (or piped to `python -`) work.
    """
    return EngineProcess(config, start_timeout_s=start_timeout_s)


class EngineProcess:
    """A handle on an engine running in its own process.

    Calls are JSON messages on a socket (nothing is unpickled); weights travel as buckets of shared
    device memory (CUDA IPC) or shared host memory (CPU), described by a JSON manifest. Calls may
    come from several threads at once. If the child dies, every pending and later call raises
    EngineProcessError instead of hanging.
    """

    def __init__(self, config: EngineConfig, *, start_timeout_s: float = 900.0) -> None:
        self.config = config
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
        self._dead_reason: str | None = None
        self._conn.send_bytes(json.dumps(dataclasses.asdict(config)).encode())
        self.info = self._wait_ready(start_timeout_s)
        # The child resolved what the config left open (max_model_len None: the model's limit and the pool's).
        self.config = dataclasses.replace(config, max_model_len=self.info["max_model_len"])
        self._reader = threading.Thread(target=self._read_loop, name="colocate-engine-reader", daemon=True)
        self._reader.start()
        # Buckets carry the engine's compute dtype, an fp8 engine's too: it quantizes what it receives.
        self._sender = BucketSender(_Transport(self), device=device_for_uuid(self.info["device_uuid"]),
                                    dtype=config.torch_dtype)

    # -- plumbing -------------------------------------------------------------------------
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
        self._dead_reason = (f"the engine process exited (exit code {self._proc.returncode})"
                             if not self._closed else "the engine process was shut down")
        for future in list(self._pending.values()):
            future.set_exception(EngineProcessError(self._dead_reason))
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
        if self._dead_reason is not None:
            raise EngineProcessError(self._dead_reason)
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

    # -- the Engine's methods -------------------------------------------------------------
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationOutput]:
        return self.wait(self.generate_async(prompts, params)[1])

    def generate_async(self, prompts: str | list[int] | list[str] | list[list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None, *,
                       on_event: Callable[[StreamEvent], None] | None = None) -> tuple[int, Future]:
        """Queue a request; (its id for `cancel`, a future of its outputs).

        With `on_event`, the request streams: it gets a StreamEvent for each step that added tokens
        to a prompt and for each prompt that finished, on the reader thread (return quickly), all
        before the future resolves.
        """
        params = SamplingParams() if params is None else params
        plist = [params] if isinstance(params, SamplingParams) else list(params)
        on_partial = None if on_event is None else (lambda partial: on_event(event_from_json(partial)))
        call_id, raw = self.call_async("generate", on_partial=on_partial, prompts=prompts,
                                       params=[dataclasses.asdict(p) for p in plist],
                                       single_params=isinstance(params, SamplingParams), stream=on_event is not None)
        outputs: Future = Future()
        raw.add_done_callback(lambda f: outputs.set_exception(f.exception()) if f.exception() is not None
                              else outputs.set_result([output_from_json(out) for out in f.result()]))
        return call_id, outputs

    def generate_stream(self, prompts: str | list[int] | list[str] | list[list[int]],
                        params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Generate and yield StreamEvents as they arrive: new tokens per prompt, then each prompt's output.

        >>> for event in engine.generate_stream(["Hello"], SamplingParams(max_new_tokens=32)):
        ...     print(event.delta.token_ids if event.delta else event.output.finish_reason)
        Closing the iterator early (break) cancels the request.
        """
        events: queue.SimpleQueue[StreamEvent | None] = queue.SimpleQueue()
        call_id, future = self.generate_async(prompts, params, on_event=events.put)
        future.add_done_callback(lambda _: events.put(None))
        try:
            while (event := events.get()) is not None:
                yield event
            self.wait(future)  # raises the request's error, if it failed
        finally:
            if not future.done():
                self.cancel(call_id)

    def cancel(self, call_id: int) -> None:
        """Abort a queued or running generate request (its outputs finish with finish_reason="abort")."""
        if self._dead_reason is None:
            self.call_async("cancel", call_id=call_id)

    def release_memory(self, tags: str | list[str] | tuple[str, ...] | None = None, *, weights_to: str = "cpu",
                       mode: str = "wait", timeout_s: float = 60.0) -> MemoryReport:
        return report_from_json(self.call("release_memory", tags=_tags(tags), weights_to=weights_to, mode=mode,
                                 timeout_s=timeout_s))

    def resume_memory(self, tags: str | list[str] | tuple[str, ...] | None = None) -> MemoryReport:
        return report_from_json(self.call("resume_memory", tags=_tags(tags)))

    def memory_status(self) -> dict[str, Any]:
        return self.call("memory_status")

    @property
    def state(self) -> dict[str, TagState]:
        return {tag: TagState(value) for tag, value in self.memory_status()["state"].items()}

    @property
    def weights_version(self) -> int | None:
        return self.memory_status()["weights_version"]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None = None,
                       partial: bool = False, bucket_bytes: int | None = None) -> dict[str, Any]:
        """Ship (HF name, tensor) pairs to the engine in double-buffered buckets (see `BucketSender`).

        On GPU the bytes never leave the device: buckets are CUDA IPC handles on the engine's GPU.
        """
        if bucket_bytes is not None and bucket_bytes != self._sender.bucket_bytes:
            self._sender = BucketSender(self._sender.transport, device=self._sender.device,
                                        dtype=self._sender.dtype, bucket_bytes=bucket_bytes)
        return self._sender.send(named_tensors, version=version, partial=partial)

    def update_weights_from_manifest(self, manifest: dict[str, Any], partial: bool = False) -> dict[str, Any]:
        """Apply a complete JSON manifest whose buckets another process exported (the HTTP form)."""
        return self.call("update_weights_from_manifest", manifest=manifest, partial=partial)

    def import_bucket(self, message: dict[str, Any]) -> dict[str, Any]:
        """One message of a bucketed update another process sends (the HTTP form of `BucketSender`)."""
        return self.call("import_bucket", message=message)

    def abort_weight_update(self) -> None:
        self.call("abort_weight_update")

    def update_weights_from_disk(self, path: str, *, version: int | None = None, partial: bool = False,
                                 ) -> dict[str, Any]:
        return self.call("update_weights_from_disk", path=str(path), version=version, partial=partial)

    def release_host_arena(self) -> int:
        return self.call("release_host_arena")

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the child and wait for it; leaves no process or socket behind. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.is_alive and self._dead_reason is None:
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

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Transport:
    """A BucketSender's way into the child: one call per bucket message, answered in order."""

    def __init__(self, process: EngineProcess) -> None:
        self.process = process

    def send_bucket(self, message: dict[str, Any]) -> Future:
        return self.process.call_async("import_bucket", message=message)[1]

    def abort_update(self) -> None:
        if self.process._dead_reason is None:
            self.process.call("abort_weight_update")


def _child_env() -> dict[str, str]:
    # The child must import the same colocate (and whatever the caller put on its path) without the
    # caller's main module: our package's folder first, then the caller's sys.path.
    paths = [str(Path(colocate.__file__).resolve().parent.parent)]
    paths += [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def _tags(tags: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    return [tags] if isinstance(tags, str) else (None if tags is None else list(tags))
