"""The request side of an engine: the scheduler, requests held by a pause, and the one thread that runs steps."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import torch

from colocate.engine.model_runner import ModelRunner
from colocate.engine.notifier import Notifier
from colocate.engine.scheduler import Scheduler
from colocate.engine.sequence import Sequence

log = logging.getLogger("colocate.engine")


class EnginePausedError(RuntimeError):
    """Retryable: the engine stayed paused longer than a request waits (EngineConfig.paused_wait_s)."""


class PauseTimeoutError(RuntimeError):
    """release_memory(mode="wait") could not drain in-flight requests in time; the engine stays awake."""


class EngineCore:
    """Runs steps on a thread of its own; callers queue requests and wait for them, control calls park it.

    >>> core.submit(seqs)                     # queued, or held while the engine is paused
    >>> core.wait(seqs)                       # raises the error a sequence failed with
    >>> with core.parked(): ...               # no step runs inside (release, resume, weight copies)
    A step's model run happens outside the lock, so queueing, cancelling and status reads never
    wait behind the device; a control call waits at most for the step in flight. `can_step` and
    `refusal` are the engine's answers to "may a step run now" and "must queued requests fail".
    """

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, *, can_step: Callable[[], bool],
                 refusal: Callable[[], str | None], paused_wait_s: float) -> None:
        self.runner, self.scheduler = runner, scheduler
        self.can_step, self.refusal, self.paused_wait_s = can_step, refusal, paused_wait_s
        self.cond = threading.Condition()  # guards the scheduler and every field below
        self.held: dict[int, Sequence] = {}  # arrived while pausing or paused; admitted on resume
        self.is_accepting = True
        self.in_flight: list[Sequence] = []  # the batch whose model run is under way
        self.num_parked = 0  # control calls that want no step to start
        self.is_shut_down = False
        self.broken: BaseException | None = None  # why the step thread stopped, if it did
        # The thread's CUDA device by index: torch.cuda.set_device refuses a device without one ("cuda").
        device = runner.device
        self._device_index = None if device.type != "cuda" else (
            device.index if device.index is not None else torch.cuda.current_device())
        # (callback, sequence) pairs for the notifier thread, in the order they happened; None stops it.
        self.notifier = Notifier()
        self._threads = [threading.Thread(target=self._loop, name="colocate-engine-steps", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- requests ---------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue every sequence (or hold them all while paused); RuntimeError if the engine refuses."""
        with self.cond:
            reason = self.refusal() if self.broken is None else f"the engine's step thread stopped: {self.broken!r}"
            if reason is not None:
                raise RuntimeError(reason)
            for seq in seqs:
                if self.is_accepting:
                    self.scheduler.add(seq)
                else:
                    seq.held_until = time.monotonic() + self.paused_wait_s
                    self.held[seq.seq_id] = seq
            self.cond.notify_all()

    def wait(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.done.wait()
            if seq.error is not None:
                raise seq.error

    def abort(self, seqs: list[Sequence]) -> None:
        """Finish unfinished `seqs` with finish_reason="abort" within one step (a client went away)."""
        with self.cond:
            for seq in seqs:
                if seq.is_finished:
                    continue
                if seq in self.in_flight:
                    seq.abort_requested = True  # its step is writing its cache: finished after the step
                elif self.held.pop(seq.seq_id, None) is not None:
                    self._finish(seq, "abort")
                else:
                    self.scheduler.abort(seq)
                    self.notifier.finished([seq])

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        seq.finish(reason, error)
        self.notifier.finished([seq])

    # -- steps ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self._device_index is not None:
                torch.cuda.set_device(self._device_index)  # this thread's kernels and graphs: the engine's device
            self._steps()
        except BaseException as e:  # noqa: BLE001 - a dead step thread must fail its callers, never hang them
            log.exception("the engine's step thread stopped")
            error = RuntimeError(f"the engine's step thread stopped: {e!r}; create a new engine")
            with self.cond:
                self.broken = e
                aborted = self.scheduler.abort_all()
                for seq in aborted:
                    seq.error = error
                self.notifier.finished(aborted)
                for seq in self.in_flight + list(self.held.values()):
                    if not seq.is_finished:
                        self._finish(seq, "abort", error)
                self.held.clear()
                self.cond.notify_all()

    def _steps(self) -> None:
        while True:
            with self.cond:
                # Also between steps: a pause draining long requests keeps the loop stepping, and the
                # requests it holds meanwhile must still fail at paused_wait_s, not when the drain ends.
                self._expire_held()
                while not self._ready_to_step():
                    if self.is_shut_down:
                        return
                    self.cond.wait(self._expire_held())
                batch = self.scheduler.schedule()
                if batch is None:  # every running sequence was preempted: the next schedule prefills
                    continue
                self.in_flight = batch.sampled
            try:
                out = self.runner.run(batch)
            except BaseException as e:  # noqa: BLE001 - the step's requests fail with it; the engine goes on
                log.exception("an engine step failed; its requests are aborted with the error")
                with self.cond:
                    for seq in batch.sampled:
                        self.scheduler.abort(seq, e)
                    self.notifier.finished(batch.sampled)
                    self.in_flight = []
                    self.cond.notify_all()
                continue
            with self.cond:
                appended = [seq for seq in batch.sampled if not seq.abort_requested]  # an abort drops its token
                finished = self.scheduler.postprocess(batch.sampled, out)
                self.notifier.updated(appended)
                self.notifier.finished(finished)
                self.in_flight = []
                self.cond.notify_all()

    def _ready_to_step(self) -> bool:
        if self.is_shut_down or self.num_parked or not self.scheduler.has_unfinished:
            return False
        reason = self.refusal()
        if reason is not None:  # e.g. awake with weights never rewritten: fail, do not wait forever
            error = RuntimeError(reason)
            for seq in self.scheduler.abort_all():
                seq.error = error
                self.notifier.finished([seq])
            return False
        return self.can_step()

    def _expire_held(self) -> float | None:
        """Withdraw held requests past their wait; seconds until the next one expires (None: none held)."""
        now = time.monotonic()
        for seq in [s for s in self.held.values() if s.held_until <= now]:
            del self.held[seq.seq_id]
            self._finish(seq, "abort", EnginePausedError(
                f"the engine has been paused for over {self.paused_wait_s} s; retry after resume_memory()"))
        return min((s.held_until - now for s in self.held.values()), default=None)

    # -- control ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """No step runs inside: waits for the step in flight, then holds the loop until the block ends."""
        with self.cond:
            self.num_parked += 1
            self.cond.wait_for(lambda: not self.in_flight)
        try:
            yield
        finally:
            with self.cond:
                self.num_parked -= 1
                self.cond.notify_all()

    def quiesce(self, mode: str, timeout_s: float) -> int:
        """Hold new requests, then finish the running ones: drain them (`wait`) or abort them. Returns aborted."""
        with self.cond:
            self.is_accepting = False
        if mode == "abort":
            with self.parked(), self.cond:
                aborted = self.scheduler.abort_all()
                self.notifier.finished(aborted)
                return len(aborted)
        with self.cond:
            if not self.cond.wait_for(lambda: not self.scheduler.has_unfinished, timeout_s):
                raise PauseTimeoutError(
                    f"{self.scheduler.num_unfinished} request(s) still in flight after timeout_s={timeout_s}; "
                    "the engine stays awake. Raise timeout_s or pass mode='abort'")
        return 0

    def wake(self) -> None:
        """Something a step waits for changed (an update closed): look again."""
        with self.cond:
            self.cond.notify_all()

    def admit_held(self) -> None:
        """The engine is awake again: accept requests, and queue those held meanwhile in arrival order."""
        with self.cond:
            self.is_accepting = True
            for seq in self.held.values():
                seq.held_until = None
                self.scheduler.add(seq)
            self.held.clear()
            self.cond.notify_all()

    def shutdown(self) -> None:
        """Abort everything queued, held or running, and stop the threads. Idempotent."""
        with self.cond:
            if self.is_shut_down:
                return
            self.is_shut_down = True
            self.cond.wait_for(lambda: not self.in_flight)
            self.notifier.finished(self.scheduler.abort_all())
            for seq in self.held.values():
                self._finish(seq, "abort")
            self.held.clear()
            self.cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self.notifier.stop()
