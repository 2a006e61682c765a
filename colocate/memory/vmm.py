"""Device memory at a fixed virtual address: CUDA virtual memory management through the driver API (ctypes).

A range of virtual addresses is reserved once; physical memory is mapped under it and unmapped
again, so the device really gets the memory back while every pointer into the range (a tensor's
data_ptr, an address baked into a captured CUDA graph) stays valid for the next mapping.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
_CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
_CUDA_ERROR_OUT_OF_MEMORY = 2


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _Driver:
    """The few libcuda entry points VMM needs, with every error turned into an exception."""

    _instance: _Driver | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        u64, p64 = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)
        sigs = {
            "cuInit": [ctypes.c_uint],
            "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
            "cuCtxPushCurrent": [ctypes.c_void_p],
            "cuCtxPopCurrent": [ctypes.POINTER(ctypes.c_void_p)],
            "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_AllocationProp),
                                              ctypes.c_int],
            "cuMemAddressReserve": [p64, ctypes.c_size_t, ctypes.c_size_t, u64, ctypes.c_uint64],
            "cuMemAddressFree": [u64, ctypes.c_size_t],
            "cuMemCreate": [p64, ctypes.c_size_t, ctypes.POINTER(_AllocationProp), ctypes.c_uint64],
            "cuMemRelease": [u64],
            "cuMemMap": [u64, ctypes.c_size_t, ctypes.c_size_t, u64, ctypes.c_uint64],
            "cuMemUnmap": [u64, ctypes.c_size_t],
            "cuMemSetAccess": [u64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t],
            "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        self.fns = {}
        for name, argtypes in sigs.items():
            # cuda.h maps some names to versioned symbols (cuCtxPushCurrent is cuCtxPushCurrent_v2); the bare
            # symbol, where it remains, keeps the old ABI.
            fn = getattr(self.lib, f"{name}_v2", None) or getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            self.fns[name] = fn
        self.call("cuInit", 0)

    @classmethod
    def get(cls) -> _Driver:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def call(self, name: str, *args: object) -> None:
        err = self.fns[name](*args)
        if err:
            text = ctypes.c_char_p()
            self.fns["cuGetErrorString"](err, ctypes.byref(text))
            message = f"{name} failed: CUDA driver error {err} ({(text.value or b'?').decode()})"
            raise torch.OutOfMemoryError(message) if err == _CUDA_ERROR_OUT_OF_MEMORY else RuntimeError(message)


def is_available(device: torch.device) -> bool:
    """Whether fixed-address buffers work here: a CUDA device and a driver with the VMM entry points."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        _Driver.get()
    except (OSError, AttributeError, RuntimeError):
        return False
    return True


class _CudaArray:
    """Enough of __cuda_array_interface__ for torch.as_tensor to wrap a raw device range without a copy."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class FixedBuffer:
    """A uint8 device tensor whose address never changes while its physical memory comes and goes.

    >>> buf = FixedBuffer(nbytes, torch.device("cuda", 0))   # reserved and mapped: usable
    >>> ptr = buf.tensor.data_ptr()
    >>> buf.unmap()                  # the device has the memory back; touching buf.tensor now faults
    >>> buf.map()                    # fresh physical memory at the same address (contents undefined)
    >>> assert buf.tensor.data_ptr() == ptr
    Physical memory is created in chunks of `chunk_bytes`, so a mapping can be made a part at a time.
    The caller guarantees nothing reads or writes the range while it is unmapped.
    """

    def __init__(self, nbytes: int, device: torch.device, *, chunk_bytes: int = 1 << 30, map_now: bool = True) -> None:
        self.device = device
        self.driver = _Driver.get()
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        cu_device = ctypes.c_int()
        self.driver.call("cuDeviceGet", ctypes.byref(cu_device), index)
        self._context = ctypes.c_void_p()
        self.driver.call("cuDevicePrimaryCtxRetain", ctypes.byref(self._context), cu_device)
        self._prop = _AllocationProp(type=_CU_MEM_ALLOCATION_TYPE_PINNED,
                                     location=_Location(_CU_MEM_LOCATION_TYPE_DEVICE, cu_device.value))
        self._access = _AccessDesc(location=_Location(_CU_MEM_LOCATION_TYPE_DEVICE, cu_device.value),
                                   flags=_CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        granularity = ctypes.c_size_t()
        with self._current():
            self.driver.call("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(self._prop),
                             _CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        self.granularity = granularity.value
        self.nbytes = nbytes
        self.chunk_bytes = max(self.granularity, -(-chunk_bytes // self.granularity) * self.granularity)
        self.reserved_bytes = max(self.granularity, -(-nbytes // self.granularity) * self.granularity)
        ptr = ctypes.c_uint64()
        with self._current():
            self.driver.call("cuMemAddressReserve", ctypes.byref(ptr), self.reserved_bytes, self.granularity, 0, 0)
        self.ptr = ptr.value
        self._handles: list[int | None] = [None] * -(-self.reserved_bytes // self.chunk_bytes)
        # Wrapped while mapped: torch asks the driver what the pointer is, which needs memory behind it.
        self.map()
        self.tensor = torch.as_tensor(_CudaArray(self.ptr, nbytes), device=device)  # [nbytes] uint8
        assert self.tensor.data_ptr() == self.ptr, f"{self.tensor.data_ptr()=} {self.ptr=}"
        if not map_now:
            self.unmap()

    @contextmanager
    def _current(self) -> Iterator[None]:
        # Driver calls need a current context on this thread: the device's primary one, which torch uses.
        self.driver.call("cuCtxPushCurrent", self._context)
        try:
            yield
        finally:
            self.driver.call("cuCtxPopCurrent", ctypes.byref(ctypes.c_void_p()))

    def _chunk(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_bytes
        return self.ptr + start, min(self.chunk_bytes, self.reserved_bytes - start)

    @property
    def is_mapped(self) -> bool:
        return all(h is not None for h in self._handles)

    @property
    def mapped_bytes(self) -> int:
        return sum(self._chunk(i)[1] for i, h in enumerate(self._handles) if h is not None)

    def map(self) -> int:
        """Map physical memory under every unmapped chunk; returns the bytes mapped.

        Out of memory: what this call mapped is unmapped again and torch.OutOfMemoryError is raised.
        """
        done = []
        try:
            with self._current():
                for i, handle in enumerate(self._handles):
                    if handle is None:
                        self._map_chunk(i)
                        done.append(i)
        except BaseException:
            with self._current():
                for i in done:
                    self._unmap_chunk(i)
            raise
        return sum(self._chunk(i)[1] for i in done)

    def _map_chunk(self, i: int) -> None:
        addr, size = self._chunk(i)
        handle = ctypes.c_uint64()
        self.driver.call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(self._prop), 0)
        try:
            self.driver.call("cuMemMap", addr, size, 0, handle.value, 0)
        except BaseException:
            self.driver.call("cuMemRelease", handle.value)
            raise
        self._handles[i] = handle.value
        self.driver.call("cuMemSetAccess", addr, size, ctypes.byref(self._access), 1)

    def _unmap_chunk(self, i: int) -> None:
        addr, size = self._chunk(i)
        handle, self._handles[i] = self._handles[i], None
        self.driver.call("cuMemUnmap", addr, size)
        self.driver.call("cuMemRelease", handle)  # the physical memory goes back to the device now

    def unmap(self) -> int:
        """Give every mapped chunk's physical memory back to the device; returns the bytes freed.

        Work queued on the device that still reads the range must be finished first: this synchronizes.
        """
        torch.cuda.synchronize(self.device)
        freed = self.mapped_bytes
        with self._current():
            for i, handle in enumerate(self._handles):
                if handle is not None:
                    self._unmap_chunk(i)
        return freed

    def close(self) -> None:
        """Unmap and free the address range; the tensor must not be used afterwards. Idempotent."""
        if self.ptr:
            self.unmap()
            with self._current():
                self.driver.call("cuMemAddressFree", self.ptr, self.reserved_bytes)
            self.ptr = 0
