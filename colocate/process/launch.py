"""`launch_engine`: the Engine in a child process, driven by JSON messages on a socket, updated through IPC buckets."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from colocate.engine import EngineConfig, GenerationOutput, SamplingParams
from colocate.engine.stream import StreamEvent
from colocate.memory.state import MemoryReport, TagState
from colocate.process.channel import ChildChannel
from colocate.process.wire import (EngineInternalError, EngineProcessError, event_from_json, output_from_json,
                                   report_from_json)
from colocate.model.probe import LogprobProbe
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
        self._channel = ChildChannel(json.dumps(dataclasses.asdict(config)), start_timeout_s=start_timeout_s)
        self.info = self._channel.info
        # The child resolved what the config left open (max_model_len None: the model's limit and the pool's).
        self.config = dataclasses.replace(config, max_model_len=self.info["max_model_len"])
        # Buckets carry the engine's compute dtype, an fp8 engine's too: it quantizes what it receives.
        self._sender = BucketSender(_Transport(self._channel), device=device_for_uuid(self.info["device_uuid"]),
                                    dtype=config.torch_dtype)
        self.call, self.call_async, self.wait = self._channel.call, self._channel.call_async, self._channel.wait

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
        if self._channel.dead_reason is None:
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
                       partial: bool = False, bucket_bytes: int | None = None,
                       verify: LogprobProbe | None = None) -> dict[str, Any]:
        """Ship (HF name, tensor) pairs to the engine in double-buffered buckets (see `BucketSender`).

        On GPU the bytes never leave the device: buckets are CUDA IPC handles on the engine's GPU.
        `verify`: a `LogprobProbe` of the sender's weights, scored by the engine before it uses them.
        """
        if bucket_bytes is not None and bucket_bytes != self._sender.bucket_bytes:
            self._sender = BucketSender(self._sender.transport, device=self._sender.device,
                                        dtype=self._sender.dtype, bucket_bytes=bucket_bytes)
        return self._sender.send(named_tensors, version=version, partial=partial, verify=verify)

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
        return self._channel.is_alive

    @property
    def pid(self) -> int:
        return self._channel.pid

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the child and wait for it; leaves no process or socket behind. Idempotent."""
        self._channel.close(timeout_s)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Transport:
    """A BucketSender's way into the child: one call per bucket message, answered in order."""

    def __init__(self, channel: ChildChannel) -> None:
        self.channel = channel

    def send_bucket(self, message: dict[str, Any]) -> Future:
        return self.channel.call_async("import_bucket", message=message)[1]

    def abort_update(self) -> None:
        if self.channel.dead_reason is None:
            self.channel.call("abort_weight_update")


def _tags(tags: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    return [tags] if isinstance(tags, str) else (None if tags is None else list(tags))
