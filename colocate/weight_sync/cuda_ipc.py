"""CUDA IPC for GPU buckets: export a buffer as JSON-safe fields, check them, and map them in another process."""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
from collections.abc import Iterator

import torch

from colocate.weight_sync.strict_json import check_int, short

# torch names its IPC ref-counter files "/torch_<pid>_<random>_<n>" (at::NewProcessWideShmHandle). The
# consumer opens that file by name and decrements the int64 at ref_counter_offset when it closes, so
# both are checked: any other name or offset would be a write to memory torch never meant to share.
_REF_COUNTER_NAME = re.compile(rb"/torch_[0-9]{1,20}_[0-9]{1,20}_[0-9]{1,20}")
_REF_COUNTER_SLOTS = 10_000  # torch::CUDA_IPC_REF_COUNTER_FILE_SIZE: int64 counters per file
_EVENT_HANDLE_BYTES = 64  # sizeof(cudaIpcEventHandle_t); torch reads that many bytes whatever it is given
_MAX_MEM_HANDLE_BYTES = 1024  # a cudaIpcMemHandle_t (64 bytes) behind torch's small version header
_MAX_UUID_CHARS = 128


def device_uuid(device: torch.device | str) -> str:
    """The GPU's UUID ("cpu" for the CPU): the same in every process, whatever its CUDA_VISIBLE_DEVICES."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise ValueError(f"weight sync supports cpu and cuda devices, got {device}")
    return str(torch.cuda.get_device_properties(_index(device)).uuid)


def device_for_uuid(uuid: str, prefer: torch.device | None = None) -> torch.device:
    """The device of this process whose UUID is `uuid` ("cpu": the CPU); `prefer` is tried first."""
    if uuid == "cpu":
        return torch.device("cpu")
    candidates = ([prefer] if prefer is not None and prefer.type == "cuda" else [])
    candidates += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in candidates:
        if device_uuid(device) == uuid:
            return device
    raise ValueError(f"the engine runs on GPU {uuid}, which this process cannot see; CUDA IPC needs the producer "
                     "and the engine on the same GPU")


def export_buffer(nbytes: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """A new uint8 [nbytes] buffer on `device` and the handle fields another process opens it with."""
    # Memory from expandable segments cannot be exported through cudaIpcGetMemHandle (pidfd_open
    # fails); take this one buffer from an ordinary cudaMalloc segment.
    with expandable_segments_off():
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)  # [nbytes (>= 1)]
        try:
            # The same call torch.multiprocessing makes (reductions.reduce_tensor). It also sets a
            # ref counter to one and records an IPC event on the current stream: that event is
            # older than any fill, which is why fill_bucket synchronizes.
            (_, mem_handle, storage_nbytes, storage_offset, ref_counter_handle, ref_counter_offset, event_handle,
             event_sync_required) = buffer.untyped_storage()._share_cuda_()
        except RuntimeError as e:
            raise RuntimeError(f"could not export a {nbytes}-byte CUDA bucket ({e}); if PYTORCH_CUDA_ALLOC_CONF "
                               "turns on expandable_segments, turn it off") from e
    handle = {"kind": "cuda_ipc", "device_uuid": device_uuid(buffer.device), "handle": _b64(mem_handle),
              "storage_nbytes": storage_nbytes, "storage_offset": storage_offset,
              "ref_counter_handle": _b64(ref_counter_handle), "ref_counter_offset": ref_counter_offset,
              "event_handle": _b64(event_handle), "event_sync_required": bool(event_sync_required),
              "nbytes": nbytes, "pid": os.getpid()}
    return buffer[:nbytes], handle


def check_fields(handle: dict, nbytes: int) -> None:
    """ValueError naming the field, unless every CUDA-specific field has the right type and range."""
    uuid = handle["device_uuid"]
    if type(uuid) is not str or not 0 < len(uuid) <= _MAX_UUID_CHARS:
        raise ValueError(f"handle.device_uuid: expected a GPU UUID string, got {short.repr(uuid)}")
    if len(_unb64(handle["handle"], "handle.handle", max_bytes=_MAX_MEM_HANDLE_BYTES)) == 0:
        raise ValueError("handle.handle: empty")
    if check_int(handle["storage_nbytes"], "handle.storage_nbytes") < nbytes:
        raise ValueError(f"handle.storage_nbytes: truncated bucket: the storage holds {handle['storage_nbytes']} "
                         f"bytes, the bucket layout needs {nbytes}")
    check_int(handle["storage_offset"], "handle.storage_offset")
    if not _REF_COUNTER_NAME.fullmatch(_unb64(handle["ref_counter_handle"], "handle.ref_counter_handle",
                                              max_bytes=64)):
        raise ValueError("handle.ref_counter_handle: not a torch IPC ref-counter name (/torch_<pid>_<n>_<n>)")
    check_int(handle["ref_counter_offset"], "handle.ref_counter_offset", maximum=_REF_COUNTER_SLOTS - 1)
    event_handle = _unb64(handle["event_handle"], "handle.event_handle", max_bytes=_EVENT_HANDLE_BYTES)
    if len(event_handle) != _EVENT_HANDLE_BYTES:
        raise ValueError(f"handle.event_handle: expected {_EVENT_HANDLE_BYTES} bytes, got {len(event_handle)}")
    if type(handle["event_sync_required"]) is not bool:
        raise ValueError(f"handle.event_sync_required: expected true or false, "
                         f"got {short.repr(handle['event_sync_required'])}")


def open_buffer(handle: dict, nbytes: int, device: torch.device) -> torch.Tensor:
    """Map a checked handle (check_fields) as a uint8 [nbytes] tensor on `device`, the GPU it lives on."""
    index = _index(device)
    local_uuid = device_uuid(torch.device("cuda", index))
    if handle["device_uuid"] != local_uuid:
        # Indices differ between processes with different CUDA_VISIBLE_DEVICES; UUIDs do not.
        raise ValueError(f"bucket on GPU {short.repr(handle['device_uuid'])}, engine on {local_uuid!r}: "
                         "the producer and the engine must share a GPU")
    total_bytes = torch.cuda.get_device_properties(index).total_memory
    if handle["storage_offset"] + handle["storage_nbytes"] > total_bytes:
        raise ValueError(f"handle.storage_offset: {handle['storage_offset']} + {handle['storage_nbytes']} bytes "
                         f"reach past the GPU's {total_bytes} bytes")
    try:
        # The same call torch.multiprocessing makes (reductions.rebuild_cuda_tensor). The current
        # stream waits on the producer's IPC event; freeing the storage synchronizes that stream
        # and decrements the producer's ref counter.
        storage = torch.UntypedStorage._new_shared_cuda(
            index, _unb64(handle["handle"]), handle["storage_nbytes"], handle["storage_offset"],
            _unb64(handle["ref_counter_handle"]), handle["ref_counter_offset"], _unb64(handle["event_handle"]),
            handle["event_sync_required"])
    except RuntimeError as e:
        raise RuntimeError(f"could not open the bucket: the producer process may have exited "
                           f"(pid {handle['pid']}, {e})") from e
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (nbytes,), (1,))  # [nbytes]


@contextlib.contextmanager
def expandable_segments_off() -> Iterator[None]:
    """Turn expandable segments off for the allocations inside, if they are on; restore the settings after."""
    if not expandable_segments_on():
        yield
        return
    previous = _allocator_settings()
    set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        # The whole previous string where torch can report it, so that the settings read back the same.
        set_allocator_settings(previous or "expandable_segments:True")


# What set_allocator_settings last set, for torch versions (2.11) that cannot report the
# allocator settings back: the environment plus our own changes is then all we can know; a
# change made through torch's private setter directly is invisible there.
_last_set: list[str] = []


def expandable_segments_on() -> bool:
    settings = _allocator_settings()
    if settings is None:  # older torch: the environment, then whatever we set since
        settings = ",".join([os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), os.environ.get("PYTORCH_ALLOC_CONF", ""),
                             *_last_set])
    is_on = False
    for option in settings.split(","):
        key, _, value = option.partition(":")
        if key.strip() == "expandable_segments":
            is_on = value.strip() == "True"
    return is_on


def _allocator_settings() -> str | None:
    """The allocator configuration string last set (from the environment or at runtime), where torch has it."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return None if getter is None else getter()


def set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # older torch
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)
    _last_set[:] = [settings]


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, path: str = "handle", *, max_bytes: int = _MAX_MEM_HANDLE_BYTES) -> bytes:
    if type(value) is not str or len(value) > 4 * (max_bytes // 3 + 1):
        raise ValueError(f"{path}: expected a base64 string of at most {max_bytes} bytes, got {short.repr(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{path}: not valid base64 ({e})") from e
