"""Bucket buffers another process can open by a JSON handle: CUDA IPC on GPUs, POSIX shared memory on CPU."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch

from colocate.weight_sync import cuda_ipc, shm
from colocate.weight_sync.cuda_ipc import device_uuid
from colocate.weight_sync.strict_json import check_int, check_keys, short

__all__ = ["HANDLE_KEYS", "ExportedBucket", "OpenedBucket", "allocate_bucket", "device_uuid", "open_bucket"]

# The lifetime protocol, for both kinds of bucket:
#   producer  allocate_bucket -> fill_bucket -> send bucket.handle
#   consumer  open_bucket -> copy out of bucket_views -> close (synchronizes the copies) -> acknowledge
#   producer  after the acknowledgement: release() (CUDA: drop the tensor, then torch.cuda.ipc_collect())
# Releasing before the acknowledgement lets the producer's caching allocator hand the memory to
# another tensor while the consumer still reads it: silently wrong weights, not an error.
# CUDA: one handle, one open. Export sets torch's IPC ref counter to one and every consumer close
# decrements it; release() frees the block only once it reads zero, otherwise the block waits in
# torch's IPC limbo. A handle opened twice underflows the (unsigned) counter and a handle never
# opened leaves it at one: either way the block stays in limbo until the producer exits. To send
# again, release and allocate a new bucket; the caching allocator hands back the same memory.
# Shared memory has no such counter: a segment may be refilled and its handle sent again.

HANDLE_KEYS: dict[str, tuple[str, ...]] = {
    "shm": ("kind", "name", "token", "nbytes", "pid"),
    "cuda_ipc": ("kind", "device_uuid", "handle", "storage_nbytes", "storage_offset", "ref_counter_handle",
                 "ref_counter_offset", "event_handle", "event_sync_required", "nbytes", "pid"),
}


class _State:
    """What a bucket's finalizer needs: the buffer (None once gone), and the segment behind it on CPU."""

    def __init__(self, buffer: torch.Tensor, segment: shm.Segment | None = None) -> None:
        self.buffer: torch.Tensor | None = buffer
        self.segment = segment


class _Bucket:
    """A bucket buffer whose memory lives until `_finalizer` runs (explicitly, at GC, or at exit)."""

    def __init__(self, state: _State, finish: Callable[[_State], None], *, at_exit: bool) -> None:
        self._state = state
        # weakref.finalize runs `finish` at most once: explicit calls, garbage collection and
        # interpreter exit share one idempotent path, and it holds no reference to self.
        self._finalizer = weakref.finalize(self, finish, state)
        self._finalizer.atexit = at_exit

    @property
    def buffer(self) -> torch.Tensor:
        if self._state.buffer is None:
            raise RuntimeError("this bucket was released or closed; its buffer is gone")
        return self._state.buffer

    def __enter__(self) -> _Bucket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._finalizer()


class ExportedBucket(_Bucket):
    """Producer side: a uint8 buffer to fill, and the JSON-safe handle a consumer opens. Keeps the memory alive
    until release().

    >>> with allocate_bucket(layout.nbytes, "cuda") as bucket:
    ...     fill_bucket(layout, dict(model.named_parameters()), bucket.buffer)
    ...     send(bucket.handle); wait_for_ack()    # release only after the consumer copied and closed
    """

    def __init__(self, state: _State, handle: dict, finish: Callable[[_State], None], *, at_exit: bool) -> None:
        super().__init__(state, finish, at_exit=at_exit)
        self.handle = handle

    def release(self) -> None:
        """Free the memory (idempotent). Shared memory: close and unlink. CUDA: drop the tensor, ipc_collect()."""
        self._finalizer()


class OpenedBucket(_Bucket):
    """Consumer side: the producer's bucket mapped into this process, as a uint8 tensor on this device.

    >>> with open_bucket(handle, nbytes=layout.nbytes, device="cuda") as bucket:
    ...     for name, view in bucket_views(layout, bucket.buffer):
    ...         params[name].copy_(view)
    >>> ack()    # closing synchronized the copies; now the producer may release
    """

    def close(self) -> None:
        """Drop this mapping (idempotent); never destroys the producer's memory."""
        self._finalizer()


def allocate_bucket(nbytes: int, device: torch.device | str) -> ExportedBucket:
    """A fresh uint8 buffer of `nbytes` on `device`, exported for another process (shared memory on CPU)."""
    check_int(nbytes, "nbytes")
    device = torch.device(device)
    if device.type == "cpu":
        segment, buffer = shm.Segment.create(nbytes)
        handle = {"kind": "shm", "name": segment.name, "token": segment.token, "nbytes": nbytes, "pid": os.getpid()}
        return ExportedBucket(_State(buffer, segment), handle, _release_shm, at_exit=True)
    if device.type != "cuda":
        raise ValueError(f"weight sync supports cpu and cuda devices, got {device}")
    buffer, handle = cuda_ipc.export_buffer(nbytes, device)
    return ExportedBucket(_State(buffer), handle, _release_cuda, at_exit=False)


def open_bucket(handle: object, *, nbytes: int, device: torch.device | str) -> OpenedBucket:
    """Map the bucket behind `handle` into this process, after checking every field of the handle.

    `nbytes` is the layout's size; the handle must be for exactly that many bytes. Raises ValueError
    for a malformed or mismatched handle (the message names the field), RuntimeError when the
    memory is gone (the producer released it or exited).
    """
    check_int(nbytes, "nbytes")
    if type(handle) is not dict:
        raise ValueError(f"handle: expected a JSON object, got {type(handle).__name__}")
    kind = handle.get("kind")
    if type(kind) is not str or kind not in HANDLE_KEYS:
        raise ValueError(f"handle.kind: expected one of {sorted(HANDLE_KEYS)}, got {short.repr(kind)}")
    check_keys(handle, "handle", required=HANDLE_KEYS[kind])
    if check_int(handle["nbytes"], "handle.nbytes") != nbytes:
        raise ValueError(f"handle.nbytes: the handle is for {handle['nbytes']} bytes, the bucket layout "
                         f"has {nbytes}")
    check_int(handle["pid"], "handle.pid")
    if kind == "shm":
        name = shm.check_segment_name(handle["name"], "handle.name")
        token = shm.check_token(handle["token"], "handle.token")
    else:
        cuda_ipc.check_fields(handle, nbytes)
    device = torch.device(device)
    device_type = "cpu" if kind == "shm" else "cuda"
    if device.type != device_type:
        raise ValueError(f"handle.kind: a {kind!r} bucket opens on a {device_type} device, not on {device}")
    if kind == "shm":
        segment, buffer = shm.Segment.attach(name, token, nbytes, producer_pid=handle["pid"])
        return OpenedBucket(_State(buffer, segment), _close_shm, at_exit=True)
    # One handle, one open (see the top of this file): this mapping's deleter decrements the counter.
    return OpenedBucket(_State(cuda_ipc.open_buffer(handle, nbytes, device)), _close_cuda, at_exit=False)


def _release_shm(state: _State) -> None:
    state.buffer = None
    assert state.segment is not None, "a shared memory bucket without its segment"
    state.segment.close(unlink=True)


def _close_shm(state: _State) -> None:
    state.buffer = None
    assert state.segment is not None, "a shared memory bucket without its segment"
    state.segment.close(unlink=False)


def _release_cuda(state: _State) -> None:
    # Once the consumer's ref counter is back to zero the block returns to the caching allocator;
    # a block whose consumer has not closed waits in torch's IPC limbo, and ipc_collect() frees
    # the ones whose consumers have closed since. Views the caller still holds keep it alive too.
    state.buffer = None
    torch.cuda.ipc_collect()


def _close_cuda(state: _State) -> None:
    assert state.buffer is not None, "closed twice"
    # Every copy out of the mapping, on any stream of this process, must finish before the
    # producer is told it may reuse the memory, and the acknowledgement follows this close.
    torch.cuda.synchronize(state.buffer.device)
    state.buffer = None  # unmaps (and decrements the producer's counter) unless views remain
