"""Request callbacks (a sequence finished, a streamed sequence grew), run on a thread of their own."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from colocate.engine.sequence import Sequence

log = logging.getLogger("colocate.engine")


class Notifier:
    """Calls each sequence's `on_update` and `on_finish` in order, outside the engine's lock.

    >>> notifier.updated(seqs); notifier.finished(seqs)   # from the step thread, under the lock: only queues
    Callbacks may call back into the engine; one thread keeps each sequence's updates in order, and
    its last update before its completion. A failing callback is logged and stops no other.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[Sequence], None], Sequence] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="colocate-engine-notify", daemon=True)
        self.thread.start()

    def finished(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.on_finish is not None:
                self._queue.put((seq.on_finish, seq))

    def updated(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.on_update is not None:
                self._queue.put((seq.on_update, seq))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, seq = item
            try:
                callback(seq)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop every other one
                log.exception("a request's callback failed")

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        self._queue.put(None)
        if self.thread is not threading.current_thread():
            self.thread.join()
