"""`launch_engine`: the Engine in a child process, driven over a pipe of JSON messages, updated through IPC buckets."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from colocate.engine import EngineConfig, GenerationOutput, SamplingParams
from colocate.engine.engine import EnginePausedError, PauseTimeoutError
from colocate.engine.memory_manager import ResumeOutOfMemoryError
from colocate.memory.state import MemoryReport, TagReport, TagState
from colocate.server.child import child_main
from colocate.weight_sync import WeightManifest, allocate_bucket, device_uuid, fill_bucket, plan_buckets

# Errors the child may raise that the parent re-raises as the same type.
_ERRORS: dict[str, type[Exception]] = {cls.__name__: cls for cls in (
    ValueError, RuntimeError, TimeoutError, EnginePausedError, PauseTimeoutError, ResumeOutOfMemoryError)}


class EngineProcessError(RuntimeError):
    """The engine's child process exited or stopped answering."""


def launch_engine(config: EngineConfig, *, start_timeout_s: float = 900.0) -> EngineProcess:
    """Start an `Engine` in a child process (spawn) and return a handle with the same methods.

    >>> with launch_engine(EngineConfig(model="tiny", device="cpu")) as engine:
    ...     engine.generate(["Hello"], SamplingParams(max_new_tokens=8))
    ...     engine.update_weights(trainer.named_parameters(), version=1)  # CUDA IPC / shared memory buckets
    """
    return EngineProcess(config, start_timeout_s=start_timeout_s)


class EngineProcess:
    """A handle on an engine running in its own process.

    Calls are JSON messages over a pipe (nothing is unpickled); weights travel as buckets of
    shared device memory (CUDA IPC) or shared host memory (CPU), described by a JSON manifest.
    Calls may come from several threads at once. If the child dies, every pending and later
    call raises EngineProcessError instead of hanging.
    """

    def __init__(self, config: EngineConfig, *, start_timeout_s: float = 900.0) -> None:
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        config_json = json.dumps(dataclasses.asdict(config))
        self._proc = ctx.Process(target=child_main, args=(config_json, child_conn), name="colocate-engine",
                                 daemon=True)
        self._proc.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._next_id = 0
        self._closed = False
        self._dead_reason: str | None = None
        self._layout_cache: tuple[tuple, tuple, int] | None = None  # (key, bucket layouts, id the child knows)
        self.info = self._wait_ready(start_timeout_s)
        self._reader = threading.Thread(target=self._read_loop, name="colocate-engine-reader", daemon=True)
        self._reader.start()

    # -- plumbing -------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.1):
            if not self._proc.is_alive():
                raise EngineProcessError(f"the engine process exited during start-up (exit code "
                                         f"{self._proc.exitcode}); see its stderr above")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise EngineProcessError(f"the engine process did not start within {timeout_s} s")
        message = json.loads(self._conn.recv_bytes())
        if not message.get("ok"):
            self._proc.join(5)
            raise _rebuild_error(message["error"])
        return message["result"]

    def _read_loop(self) -> None:
        try:
            while True:
                message = json.loads(self._conn.recv_bytes())
                future = self._pending.pop(message["id"], None)
                if future is None:
                    continue
                if message["ok"]:
                    future.set_result(message["result"])
                else:
                    future.set_exception(_rebuild_error(message["error"]))
        except (EOFError, OSError):
            pass
        self._proc.join(1)
        self._dead_reason = (f"the engine process exited (exit code {self._proc.exitcode})"
                             if not self._closed else "the engine process was shut down")
        for future in list(self._pending.values()):
            future.set_exception(EngineProcessError(self._dead_reason))
        self._pending.clear()

    def _call(self, method: str, **args: Any) -> Any:
        return self._wait(self._call_async(method, **args))

    def _call_async(self, method: str, **args: Any) -> Future:
        if self._dead_reason is not None:
            raise EngineProcessError(self._dead_reason)
        future: Future = Future()
        with self._send_lock:
            call_id = self._next_id
            self._next_id += 1
            self._pending[call_id] = future
            try:
                self._conn.send_bytes(json.dumps({"id": call_id, "method": method, "args": args}).encode())
            except (OSError, ValueError) as e:
                self._pending.pop(call_id, None)
                raise EngineProcessError(f"cannot reach the engine process: {e}") from e
        return future

    def _wait(self, future: Future) -> Any:
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if not self._proc.is_alive() and not future.done():
                    # The reader fails pending calls once it sees EOF; give it a moment.
                    self._reader.join(2)
                    if not future.done():
                        raise EngineProcessError(f"the engine process exited (exit code {self._proc.exitcode})")

    # -- the Engine's methods -------------------------------------------------------------
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationOutput]:
        if params is None:
            params = SamplingParams()
        plist = [params] if isinstance(params, SamplingParams) else list(params)
        raw = self._call("generate", prompts=prompts, params=[dataclasses.asdict(p) for p in plist],
                         single_params=isinstance(params, SamplingParams))
        return [GenerationOutput(**out) for out in raw]

    def release_memory(self, tags: str | list[str] | tuple[str, ...] | None = None, *, weights_to: str = "cpu",
                       mode: str = "wait", timeout_s: float = 60.0) -> MemoryReport:
        return _report(self._call("release_memory", tags=_tags(tags), weights_to=weights_to, mode=mode,
                                  timeout_s=timeout_s))

    def resume_memory(self, tags: str | list[str] | tuple[str, ...] | None = None) -> MemoryReport:
        return _report(self._call("resume_memory", tags=_tags(tags)))

    def memory_status(self) -> dict[str, Any]:
        return self._call("memory_status")

    @property
    def state(self) -> dict[str, TagState]:
        return {tag: TagState(value) for tag, value in self._call("memory_status")["state"].items()}

    @property
    def weights_version(self) -> int | None:
        return self._call("memory_status")["weights_version"]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None = None,
                       bucket_bytes: int = 512 << 20) -> dict[str, Any]:
        """Ship (HF name, tensor) pairs to the engine in buckets, without a trip through the host on GPU.

        The layout of every bucket is announced and validated first; then the buckets are
        filled (cast to the engine's dtype) into two shared buffers in turn, each copied in
        place by the child while the next is filled: peak extra device memory is two buckets
        (plus, for a single tensor larger than a bucket, that tensor).
        """
        start = time.perf_counter()
        tensors = list(named_tensors)
        if not tensors:
            raise ValueError("update_weights got no tensors")
        by_name = dict(tensors)
        if len(by_name) != len(tensors):
            raise ValueError("update_weights got the same name twice")
        bad = [n for n, t in tensors if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point]
        if bad:
            raise ValueError(f"refused weight update, nothing was sent: {bad[:5]} are not floating-point tensors")
        shapes = tuple((n, tuple(t.shape)) for n, t in tensors)
        cached = self._layout_cache
        if cached is not None and cached[0] == (shapes, bucket_bytes):
            # Same layout as the last update: the child still holds it, validated; send its id only.
            buckets, layout_id = cached[1], cached[2]
            manifest = WeightManifest(version=version, buckets=buckets)
            begin_args = {"manifest": None, "layout_id": layout_id, "version": version}
        else:
            buckets = plan_buckets(shapes, dtype=self.config.torch_dtype, bucket_bytes=bucket_bytes)
            manifest = WeightManifest(version=version, buckets=buckets)
            layout_id = self._next_id  # unique per handle
            begin_args = {"manifest": manifest.to_dict(), "layout_id": layout_id, "version": version}
        device = self._bucket_device(tensors[0][1])
        planned = time.perf_counter()
        self._layout_cache = None  # until the child has accepted it
        # Two buffers, exported once per update and reused: while the child copies bucket i out
        # of one, bucket i + 1 is filled into the other. A tensor larger than a bucket gets a
        # buffer of its own, freed right after its copy. Peak extra device memory: two buckets,
        # plus that one tensor while it is in flight. The first bucket's call opens the update
        # and the last one's closes it; the child runs these calls in order.
        size = max((layout.nbytes for layout in buckets if layout.nbytes <= bucket_bytes), default=0)
        num_pooled = sum(layout.nbytes <= size for layout in buckets)
        pool = [allocate_bucket(size, device) for _ in range(min(2, num_pooled))]
        in_flight: list[Future] = []
        pending: dict[int, Future] = {}  # pool slot -> the call still reading it
        turn = 0
        last = len(buckets) - 1
        try:
            for index, layout in enumerate(buckets):
                extra = {"begin": begin_args if index == 0 else None, "finish": index == last}
                if layout.nbytes > size:
                    with allocate_bucket(layout.nbytes, device) as own:
                        fill_bucket(layout, by_name, own.buffer)
                        future = self._call_async("load_weight_bucket", index=index, handle=own.handle,
                                                  keep_open=False, **extra)
                        in_flight.append(future)
                        self._wait(future)  # its buffer goes when this block ends
                    continue
                slot, turn = turn % len(pool), turn + 1
                if slot in pending:
                    self._wait(pending.pop(slot))  # the child is done reading this buffer
                fill_bucket(layout, by_name, pool[slot].buffer)  # waits for its copies on CUDA
                pending[slot] = self._call_async("load_weight_bucket", index=index, handle=pool[slot].handle,
                                                 keep_open=True, **extra)
                in_flight.append(pending[slot])
            copied = time.perf_counter()
            results = [self._wait(future) for future in in_flight]
            result = results[-1]
        except BaseException:
            for future in in_flight:  # let the child finish with our buffers before they go
                try:
                    self._wait(future)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            if self._dead_reason is None:
                try:
                    self._call("abort_weight_update")
                except EngineProcessError:
                    pass
            raise
        finally:
            # After finish/abort the child has closed its mappings of these buffers.
            for bucket in pool:
                bucket.release()
        self._layout_cache = ((shapes, bucket_bytes), buckets, layout_id)
        end = time.perf_counter()
        result.update(num_buckets=len(buckets), bytes=manifest.total_bytes, seconds=end - start,
                      phase_seconds={"plan": planned - start, "fill_and_send": copied - planned,
                                     "wait": end - copied})
        return result

    def _bucket_device(self, example: torch.Tensor) -> torch.device:
        engine_uuid = self.info["device_uuid"]
        if engine_uuid == "cpu":
            return torch.device("cpu")
        if example.is_cuda and device_uuid(example.device) == engine_uuid:
            return example.device
        for index in range(torch.cuda.device_count()):
            if device_uuid(torch.device("cuda", index)) == engine_uuid:
                return torch.device("cuda", index)
        raise ValueError(f"the engine runs on GPU {engine_uuid}, which this process cannot see; CUDA IPC needs "
                         "the producer and the engine on the same GPU")

    def update_weights_from_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Apply a complete JSON manifest whose buckets another process exported (the HTTP form).

        The child opens every bucket before the first copy, so a bogus or vanished handle
        changes nothing. The producer keeps its buckets alive until this returns.
        """
        return self._call("update_weights_from_manifest", manifest=manifest)

    def update_weights_from_disk(self, path: str, *, version: int | None = None) -> dict[str, Any]:
        return self._call("update_weights_from_disk", path=str(path), version=version)

    def release_host_arena(self) -> int:
        return self._call("release_host_arena")

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the child and wait for it; leaves no process or pipe behind. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._proc.is_alive() and self._dead_reason is None:
            try:
                self._call("shutdown")
            except EngineProcessError:
                pass
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
        self._reader.join(5)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _tags(tags: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    return [tags] if isinstance(tags, str) else (None if tags is None else list(tags))


def _report(d: dict[str, Any]) -> MemoryReport:
    tags = {tag: TagReport(**r) for tag, r in d["tags"].items()}
    return MemoryReport(action=d["action"], tags=tags, seconds=d["seconds"], device_free_before=d["device_free_before"],
                        device_free_after=d["device_free_after"], num_aborted=d["num_aborted"])


def _rebuild_error(error: dict[str, str]) -> Exception:
    cls = _ERRORS.get(error.get("type", ""), RuntimeError)
    return cls(error.get("message", "the engine process reported an error"))
