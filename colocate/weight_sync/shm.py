"""POSIX shared-memory segments for CPU buckets: create, attach without owning, close without crashing views."""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from colocate.weight_sync.strict_json import short

_NAME = re.compile(r"[A-Za-z0-9_./-]{1,200}")
_ATTACH_LOCK = threading.Lock()


def check_segment_name(name: object, path: str) -> str:
    """The name without its leading '/', if it cannot walk out of /dev/shm; else ValueError naming `path`."""
    body = name[1:] if type(name) is str and name.startswith("/") else name
    # One leading '/' at most, none after it, no '..'.
    if type(name) is not str or not _NAME.fullmatch(name) or "/" in body or ".." in body or body in ("", "."):
        raise ValueError(f"{path}: expected a shared memory name matching {_NAME.pattern} with no '/' after the "
                         f"first character and no '..', got {short.repr(name)}")
    return body


def create_segment(nbytes: int) -> tuple[SharedMemory, torch.Tensor]:
    """A new segment and a uint8 [nbytes] tensor over it. This process owns it: close_segment(unlink=True)."""
    shm = SharedMemory(create=True, size=max(nbytes, 1))  # size 0 is refused; the tensor keeps nbytes
    return shm, _tensor(shm, nbytes)


def attach_segment(name: str, nbytes: int, *, producer_pid: int) -> tuple[SharedMemory, torch.Tensor]:
    """Map another process's segment; RuntimeError if it is gone, ValueError if it is smaller than nbytes."""
    try:
        shm = _attach(name)
    except FileNotFoundError as e:
        raise RuntimeError(f"could not open the bucket: shared memory {name!r} is gone; the producer process "
                           f"(pid {producer_pid}) may have exited or released it") from e
    except ValueError as e:  # mmap refuses an empty segment
        raise ValueError(f"truncated bucket: shared memory {name!r} is empty, the bucket layout needs {nbytes} "
                         "bytes") from e
    if shm.size < nbytes:
        shm.close()
        raise ValueError(f"truncated bucket: shared memory {name!r} holds {shm.size} bytes, the bucket layout "
                         f"needs {nbytes}")
    return shm, _tensor(shm, nbytes)


def close_segment(shm: SharedMemory, *, unlink: bool) -> None:
    """Unmap (once no view points into the mapping any more) and, for the owner, unlink."""
    if unlink:
        # The name goes now; the memory goes with the last mapping (a consumer still copying keeps it).
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
    try:
        shm.close()
    except BufferError:
        # Views from bucket_views() still point into the mapping: hand the mmap over to them. It
        # is unmapped when the last view is freed; dropping it here keeps SharedMemory.__del__
        # from trying again. The file descriptor is closed now.
        shm._mmap = None  # type: ignore[attr-defined]
        shm.close()


def _tensor(shm: SharedMemory, nbytes: int) -> torch.Tensor:
    # A slice of shm.buf, not shm.buf itself: the slice holds an export on the mmap for as long as
    # the tensor (and every view of it) lives, so closing the segment under a live view raises
    # BufferError (handled in close_segment) instead of unmapping memory the view still points to,
    # which would crash the process at the view's next access.
    return torch.frombuffer(shm.buf[:max(nbytes, 1)], dtype=torch.uint8)[:nbytes]  # [nbytes]


def _attach(name: str) -> SharedMemory:
    """Attach to an existing segment without making this process responsible for unlinking it."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    # Before 3.13, attaching registers the segment with this process's resource tracker, which
    # unlinks what it knows when its processes exit: an engine that exits would destroy the
    # trainer's bucket. Unregistering after attaching (the usual fix) breaks when the engine is
    # the trainer's spawned child: the two share one tracker, whose single entry for the
    # trainer's segment would be removed (a KeyError traceback at the trainer's unlink, and no
    # cleanup if the trainer crashes). So this one registration is skipped; the lock keeps two
    # attaches from interleaving their swaps, and other registrations pass through meanwhile.
    register = resource_tracker.register

    def register_others(resource_name: str, resource_type: str) -> None:
        if resource_type != "shared_memory" or resource_name.lstrip("/") != name:
            register(resource_name, resource_type)

    with _ATTACH_LOCK:
        resource_tracker.register = register_others
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register
