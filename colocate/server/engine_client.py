"""The server's view of an engine, here or in its child process: awaitable calls, generate cancellable or streamed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

from colocate.engine import Engine, GenerationOutput, SamplingParams
from colocate.engine.core import EnginePausedError
from colocate.engine.sequence import Sequence
from colocate.engine.stream import StreamEvent, submit_streaming
from colocate.process import EngineProcess
from colocate.process.service import EngineService

T = TypeVar("T")
# Control calls (pause, resume, updates) run one after another in the engine anyway; two threads let an
# abort of an update get through while a bucket is being copied, and a status call never takes one.
MAX_CONTROL_THREADS = 2
_END = object()  # the last item of a stream's queue when every sequence finished cleanly


class EngineStream:
    """A streamed request, already queued: `async for event in stream` gives its StreamEvents.

    >>> stream = engine.stream(prompts, params)     # submitted now: a bad prompt raises here
    >>> async for event in stream: ...
    >>> stream.close()                              # aborts what is unfinished (also on cancellation)
    """

    def __init__(self, queue: asyncio.Queue, abort: Callable[[], None], forget: Callable[[], None]) -> None:
        self._queue, self._abort, self._forget = queue, abort, forget
        self.is_done = False

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self.is_done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        if item is _END or isinstance(item, BaseException):
            self.is_done = True
            self._forget()
            if item is _END:
                raise StopAsyncIteration
            raise item
        return item

    def close(self) -> None:
        if not self.is_done:
            self.is_done = True
            self._abort()
            self._forget()


class AsyncEngine:
    """Awaitable engine calls for the event loop: generate holds no thread, control has threads of its own.

    >>> engine = AsyncEngine(Engine(config))           # or AsyncEngine(launch_engine(config))
    >>> outs = await engine.generate(prompts, params)   # cancelled (client gone): the requests are aborted
    >>> async for event in engine.stream(prompts, params): ...   # new tokens as steps append them
    >>> report = await engine.control(engine.engine.release_memory, tags=None)
    Status reads (`memory_status`) never wait for a thread or a lock, whatever is running.
    `hold_generation()` makes new requests wait (and may abort running ones) until `continue_generation()`.
    """

    def __init__(self, engine: Engine | EngineProcess) -> None:
        self.engine = engine
        self.is_process = isinstance(engine, EngineProcess)
        # The engine's JSON calls (manifests, bucket messages): its child answers them, or a service here.
        self.json_side: EngineProcess | EngineService = engine if self.is_process else EngineService(engine)
        self._control = concurrent.futures.ThreadPoolExecutor(MAX_CONTROL_THREADS, thread_name_prefix="colocate-ctl")
        self._held: asyncio.Event | None = None  # set while generation is held; set() lets the waiters in
        self._active: dict[int, Callable[[], None]] = {}  # running requests -> how to abort each
        self._ids = itertools.count()

    @property
    def config(self) -> Any:
        return self.engine.config

    async def generate(self, prompts: Any, params: SamplingParams | list[SamplingParams]) -> list[GenerationOutput]:
        """Queue and await; if the awaiting task is cancelled (its client went away), abort the requests."""
        await self._admitted()
        loop = asyncio.get_running_loop()
        if self.is_process:
            call_id, future = self.engine.generate_async(prompts, params)
            done = asyncio.wrap_future(future)
            abort = lambda: self.engine.cancel(call_id)
        else:
            done = loop.create_future()
            seqs = submit_streaming(self.engine, prompts, params, on_done=lambda s: loop.call_soon_threadsafe(
                lambda: done.done() or done.set_result(s)))
            abort = lambda: self.engine.abort(seqs)
        key = self._track(abort)
        try:
            result = await done
        except asyncio.CancelledError:
            abort()
            raise
        finally:
            self._active.pop(key, None)
        if self.is_process:
            return result
        error = next((s.error for s in result if s.error is not None), None)
        if error is not None:
            raise error
        return [self.engine.output(s) for s in result]

    async def stream(self, prompts: Any, params: SamplingParams | list[SamplingParams]) -> EngineStream:
        """Queue a request whose StreamEvents arrive as the engine produces them (see `EngineStream`)."""
        await self._admitted()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        if self.is_process:
            call_id, future = self.engine.generate_async(prompts, params, on_event=put)
            future.add_done_callback(lambda f: put(_END if f.exception() is None else f.exception()))
            abort = lambda: self.engine.cancel(call_id)
        else:
            def done(seqs: list[Sequence]) -> None:
                put(next((s.error for s in seqs if s.error is not None), _END))

            seqs = submit_streaming(
                self.engine, prompts, params, on_delta=lambda i, d: put(StreamEvent(i, delta=d)),
                on_finish=lambda i, s: put(StreamEvent(i, output=self.engine.output(s))), on_done=done)
            abort = lambda: self.engine.abort(seqs)
        key = self._track(abort)
        return EngineStream(queue, abort, lambda: self._active.pop(key, None))

    def _track(self, abort: Callable[[], None]) -> int:
        key = next(self._ids)
        self._active[key] = abort
        return key

    # -- holding generation (the compatibility routes' pause_generation) -------------------
    @property
    def is_generation_held(self) -> bool:
        return self._held is not None

    def hold_generation(self, *, abort_running: bool) -> int:
        """New requests wait (up to paused_wait_s, then 503) until `continue_generation`; with
        `abort_running`, requests under way finish now with finish_reason "abort". Returns how many."""
        if self._held is None:
            self._held = asyncio.Event()
        aborts = list(self._active.values()) if abort_running else []
        for abort in aborts:
            abort()
        return len(aborts)

    def continue_generation(self) -> bool:
        """Let held and new requests in; False if generation was not held."""
        held, self._held = self._held, None
        if held is not None:
            held.set()
        return held is not None

    async def _admitted(self) -> None:
        held = self._held
        if held is None:
            return
        try:
            await asyncio.wait_for(held.wait(), self.config.paused_wait_s)
        except asyncio.TimeoutError:  # TimeoutError from 3.11 on
            raise EnginePausedError(f"generation has been held for over {self.config.paused_wait_s} s "
                                    "(POST /pause_generation); retry after POST /continue_generation") from None

    # -- control and status ---------------------------------------------------------------
    async def control(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking control call (release, resume, an update) on the control threads."""
        return await asyncio.get_running_loop().run_in_executor(self._control, lambda: fn(*args, **kwargs))

    async def memory_status(self) -> dict[str, Any]:
        if self.is_process:
            return await asyncio.wrap_future(self.engine.call_async("memory_status")[1])
        return self.engine.memory_status()  # lock-free reads: fine on the event loop

    def limits(self) -> dict[str, Any]:
        """max_model_len (and what set it) and the KV cache's capacity in tokens."""
        info = self.engine.info if self.is_process else self.engine.limits()
        return {key: info[key] for key in ("max_model_len", "max_model_len_reason", "kv_cache_tokens")}

    def close(self) -> None:
        self._control.shutdown(wait=False, cancel_futures=True)
