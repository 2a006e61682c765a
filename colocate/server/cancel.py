"""Abandoned work stops: a request whose client disconnects is cancelled, and the engine aborts its sequences."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which aborts its engine requests) and stop.

    The body has been read by then, so the next message on the connection can only be
    `http.disconnect`: waiting for it costs nothing while the work runs.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its handler aborts the engine's sequences; let it run before we go on
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result()  # raises CancelledError if the client went away: nothing is sent to nobody


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
