"""The server's view of an engine, here or in its child process: awaitable calls, generate cancellable."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from colocate.engine import Engine, GenerationOutput, SamplingParams
from colocate.engine.sequence import Sequence
from colocate.process import EngineProcess
from colocate.process.service import EngineService

T = TypeVar("T")
# Control calls (pause, resume, updates) run one after another in the engine anyway; two threads let an
# abort of an update get through while a bucket is being copied, and a status call never takes one.
MAX_CONTROL_THREADS = 2


class AsyncEngine:
    """Awaitable engine calls for the event loop: generate holds no thread, control has threads of its own.

    >>> engine = AsyncEngine(Engine(config))           # or AsyncEngine(launch_engine(config))
    >>> outs = await engine.generate(prompts, params)   # cancelled (client gone): the requests are aborted
    >>> report = await engine.control(engine.engine.release_memory, tags=None)
    Status reads (`memory_status`) never wait for a thread or a lock, whatever is running.
    """

    def __init__(self, engine: Engine | EngineProcess) -> None:
        self.engine = engine
        self.is_process = isinstance(engine, EngineProcess)
        # The engine's JSON calls (manifests, bucket messages): its child answers them, or a service here.
        self.json_side: EngineProcess | EngineService = engine if self.is_process else EngineService(engine)
        self._control = concurrent.futures.ThreadPoolExecutor(MAX_CONTROL_THREADS, thread_name_prefix="colocate-ctl")

    @property
    def config(self) -> Any:
        return self.engine.config

    async def generate(self, prompts: Any, params: SamplingParams | list[SamplingParams]) -> list[GenerationOutput]:
        """Queue and await; if the awaiting task is cancelled (its client went away), abort the requests."""
        if self.is_process:
            call_id, future = self.engine.generate_async(prompts, params)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                self.engine.cancel(call_id)
                raise
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_finish(_: Sequence) -> None:
            if all(s.is_finished for s in seqs):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        seqs: list[Sequence] = []
        seqs.extend(self.engine.submit(prompts, params, on_finish=on_finish))
        if all(s.is_finished for s in seqs):  # finished before the callback could see the whole list
            on_finish(seqs[0])
        try:
            await done
        except asyncio.CancelledError:
            self.engine.abort(seqs)
            raise
        error = next((s.error for s in seqs if s.error is not None), None)
        if error is not None:
            raise error
        return [self.engine.output(s) for s in seqs]

    async def control(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking control call (release, resume, an update) on the control threads."""
        return await asyncio.get_running_loop().run_in_executor(self._control, lambda: fn(*args, **kwargs))

    async def memory_status(self) -> dict[str, Any]:
        if self.is_process:
            return await asyncio.wrap_future(self.engine.call_async("memory_status")[1])
        return self.engine.memory_status()  # lock-free reads: fine on the event loop

    def close(self) -> None:
        self._control.shutdown(wait=False, cancel_futures=True)
