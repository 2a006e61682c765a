"""Trainer-side offload: a module's parameters, gradients and optimizer state to host memory and back."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from colocate.memory.arena import HostArena
from colocate.memory.device import SideStream, empty_own_segment, free_bytes, give_back_cached
from colocate.memory.layout import align, pack, views
from colocate.memory.state import MemoryReport, TagReport, TagState
from colocate.trainer.disk_tier import DiskTier


@dataclass
class _Entry:
    kind: str  # "params" | "grads" | "optimizer"
    key: tuple  # stable identity across calls
    get: Callable[[], torch.Tensor]
    set: Callable[[torch.Tensor], None]
    host: torch.Tensor | None = None  # a host tensor it is released into instead of the arena (params only)


class TrainerOffload:
    """Moves everything a trainer keeps on its device to a reused host arena, and back.

    >>> offload = TrainerOffload(policy, optimizer, device="cuda")
    >>> offload.release()   # params, grads, AdamW moments -> pinned host; device memory freed
    >>> offload.resume()    # one device allocation, one copy back; training continues bitwise
    Parameters keep their identity (only `.data` moves), so the optimizer and any hooks stay
    valid. A resume places everything in one flat device buffer, so later releases are one copy.
    `host_copies` ({id(param): host tensor of its shape and dtype}, e.g. `HostAdamW.host_copies()`): those
    weights are released into that tensor, which the host optimizer keeps anyway, rather than into the
    arena or the disk file, so host memory holds them once (a host release points them at it; a disk
    release, like every tensor it writes, at an empty stand-in), and resumed from it.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 device: torch.device | str | None = None, arena: HostArena | None = None,
                 disk_dir: str | Path | None = None, exclude: Iterable[nn.Parameter] = (),
                 host_copies: Mapping[int, torch.Tensor] | None = None) -> None:
        self.module, self.optimizer = module, optimizer
        self._host_copies = dict(host_copies or {})
        self._shared: list[_Entry] = []  # released into their host copies
        self._exclude = {id(p) for p in exclude}
        self.disk = DiskTier(disk_dir) if disk_dir is not None else None
        self._disk_layout: list[torch.Tensor] = []  # meta stand-ins of what is on disk
        first = next(module.parameters())
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N; so must we
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_cuda = self.device.type == "cuda"
        self.arena = arena or HostArena(pin=self.is_cuda)
        self.state = TagState.AWAKE
        self._entries: list[_Entry] = []
        self._offsets: list[int] = []
        self._device_buffer: torch.Tensor | None = None
        self.side = SideStream(self.device)

    def _collect(self) -> list[_Entry]:
        entries: list[_Entry] = []
        # Tied parameters once; `exclude`d ones (layers streamed from host memory) are not this offload's to move.
        params = [p for p in dict.fromkeys(self.module.parameters()) if id(p) not in self._exclude]
        for i, p in enumerate(params):
            host = self._host_copies.get(id(p))
            if host is not None and (host.shape != p.shape or host.dtype != p.dtype):
                host = None  # e.g. fp32 masters of bf16 weights: not the weights themselves
            entries.append(_Entry("params", ("p", i), lambda p=p: p.data, lambda t, p=p: setattr(p, "data", t), host))
            if p.grad is not None:
                entries.append(_Entry("grads", ("g", i), lambda p=p: p.grad, lambda t, p=p: setattr(p, "grad", t)))
        if self.optimizer is not None:
            index = {id(p): i for i, p in enumerate(params)}
            for p, st in self.optimizer.state.items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.device == self.device:
                        entries.append(_Entry("optimizer", ("s", index.get(id(p), -1), k), lambda st=st, k=k: st[k],
                                              lambda t, st=st, k=k: st.__setitem__(k, t)))
        return entries

    def _is_flat(self, tensors: list[torch.Tensor], offsets: list[int]) -> bool:
        buf = self._device_buffer
        return buf is not None and all(
            t.data_ptr() == buf.data_ptr() + off and t.is_contiguous() for t, off in zip(tensors, offsets))

    def release(self, to: str = "host") -> MemoryReport:
        """Copy params, grads and optimizer state to the host arena and free their device memory.

        `to="disk"` (needs `disk_dir`): then write the arena to a file there and free the host memory too;
        the tensors point at the meta device until `resume` reads the file back (and removes it).
        """
        if to not in ("host", "disk"):
            raise ValueError(f"to={to!r} must be 'host' or 'disk'")
        if to == "disk" and self.disk is None:
            raise ValueError("to='disk' needs TrainerOffload(..., disk_dir=<folder>)")
        report = MemoryReport("release", device_free_before=self._free())
        if self.state is TagState.PAUSED:
            report.tags["trainer"] = TagReport("paused", "paused", message="no-op: already released")
            return report
        start = time.perf_counter()
        collected = self._collect()
        entries, shared = [e for e in collected if e.host is None], [e for e in collected if e.host is not None]
        tensors, shared_tensors = [e.get() for e in entries], [e.get() for e in shared]
        offsets, total = _pack(tensors)
        if shared:  # into the host optimizer's copies, in host memory whatever `to` says: held once, not twice
            self.side.copy([e.host for e in shared], shared_tensors, wait=True)
        if to == "disk":
            # Straight from the device (or host) tensors to the file, through two small bounce buffers: host
            # memory stays at 2 chunks whatever the state's size, and nothing is pinned per release.
            self.disk.write_tensors(tensors, offsets, total)
            self._disk_layout = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
            # Every tensor, the shared weights too, points at an empty stand-in: a gradient must match its weight.
            self._point(entries + shared, [torch.empty(0, dtype=t.dtype) for t in tensors + shared_tensors])
        else:
            host = self.arena.reserve(total)
            # The host copy must be complete before the device memory is reused: wait=True.
            if self._is_flat(tensors, offsets) and self._device_buffer.numel() >= total:
                self.side.copy(host, self._device_buffer[:total], wait=True)  # one copy after the first resume
            else:
                self.side.copy(_views(host, tensors, offsets), tensors, wait=True)
            # One call: weights are set before gradients, which must match them in size and device.
            self._point(entries + shared, _views(host, tensors, offsets) + [e.host for e in shared])
        self._entries, self._shared, self._offsets, self._device_buffer = entries, shared, offsets, None
        self.state = TagState.PAUSED
        self._fill(report, entries + shared, tensors + shared_tensors, start)
        # Drop the last references to the device tensors (views keep the whole flat buffer
        # alive) before emptying the cache; otherwise their memory stays reserved by this
        # process, where no other process can use it (measured: 7 GiB left after a 0.5B release).
        del tensors, shared_tensors
        give_back_cached(self.device)
        if to == "disk":
            self.arena.release()  # an arena left from earlier host releases goes too
            for tag in report.tags.values():
                tag.host_bytes, tag.message = 0, f"on disk: {self.disk.path}"
        report.seconds = time.perf_counter() - start
        report.device_free_after = self._free()
        return report

    def resume(self) -> MemoryReport:
        """Allocate one device buffer, copy everything back, and point params, grads and state at it."""
        report = MemoryReport("resume", device_free_before=self._free())
        if self.state is TagState.AWAKE:
            report.tags["trainer"] = TagReport("awake", "awake", message="no-op: already on the device")
            return report
        start = time.perf_counter()
        entries = self._entries
        on_disk = self.disk is not None and self.disk.path is not None
        host_tensors = self._disk_layout if on_disk else [e.get() for e in entries]  # shapes and dtypes
        _, total = _pack(host_tensors)
        shared_hosts = [e.host for e in self._shared]
        shared_offsets, shared_total = _pack(shared_hosts)
        base = align(total)  # the shared weights after the rest, in the same buffer
        buffer = empty_own_segment(base + shared_total, dtype=torch.uint8, device=self.device)  # OOM: no change
        if on_disk:
            self.disk.read_into(buffer[:total])  # through the bounce buffers; the file goes once read
        else:
            buffer[:total].copy_(self.arena.reserve(total), non_blocking=self.is_cuda)
        placed = _views(buffer[base:], shared_hosts, shared_offsets)
        for view, host in zip(placed, shared_hosts):
            view.copy_(host, non_blocking=self.is_cuda)
        # One call: weights are set before gradients, which must match them in size and device.
        self._point(entries + self._shared, _views(buffer, host_tensors, self._offsets) + placed)
        entries, host_tensors, self._shared = entries + self._shared, host_tensors + shared_hosts, []
        self._device_buffer = buffer
        self.state = TagState.AWAKE
        if self.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self._fill(report, entries, host_tensors, start)
        return report

    def offload(self) -> MemoryReport:
        """Deprecated name of `release` (removed in 0.3)."""
        warnings.warn("TrainerOffload.offload() is now release()", DeprecationWarning, stacklevel=2)
        return self.release()

    def onload(self) -> MemoryReport:
        """Deprecated name of `resume` (removed in 0.3)."""
        warnings.warn("TrainerOffload.onload() is now resume()", DeprecationWarning, stacklevel=2)
        return self.resume()

    @staticmethod
    def _point(entries: list[_Entry], tensors: list[torch.Tensor]) -> None:
        # Parameters first: a gradient must match its parameter's device when it is set.
        for e, t in sorted(zip(entries, tensors), key=lambda et: et[0].kind != "params"):
            e.set(t)

    def _fill(self, report: MemoryReport, entries: list[_Entry], tensors: list[torch.Tensor], start: float) -> None:
        before, after = ("awake", "paused") if report.action == "release" else ("paused", "awake")
        for kind in ("params", "grads", "optimizer"):
            nbytes = sum(t.numel() * t.element_size() for e, t in zip(entries, tensors) if e.kind == kind)
            report.tags[kind] = TagReport(before, after, device_bytes=nbytes, host_bytes=nbytes)
        report.seconds = time.perf_counter() - start
        report.device_free_after = self._free()

    def device_bytes(self) -> int:
        """Bytes of params, grads and optimizer state on the device now; 0 while released."""
        if self.state is TagState.PAUSED:
            return 0
        return sum(t.numel() * t.element_size() for t in (e.get() for e in self._collect()))  # tied ones once

    def _free(self) -> int:
        return free_bytes(self.device)


def _pack(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    return pack((t.shape, t.dtype) for t in tensors)


def _views(buffer: torch.Tensor, like: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Views into a uint8 buffer shaped like `like`, at `offsets` (bytes)."""
    return views(buffer, ((t.shape, t.dtype) for t in like), offsets)
