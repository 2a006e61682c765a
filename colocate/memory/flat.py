"""A module's parameters as views into one flat buffer, so freeing, restoring and copying them is one operation each."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from colocate.memory.device import empty_own_segment
from colocate.memory.host import pinned_empty
from colocate.memory.layout import pack, tensor_nbytes, views
from colocate.memory.vmm import FixedBuffer


@dataclass
class _Slot:
    name: str
    owners: list[tuple[nn.Module, str]]  # every (module, attribute) holding this parameter: tied weights share one
    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool


class FlatParameters:
    """Places every unique parameter of `module` at a fixed offset of one uint8 buffer.

    >>> flat = FlatParameters(model)        # model built on meta
    >>> flat.materialize("cuda")            # one allocation; parameters become views into it
    >>> flat.to_meta()                      # parameters go to meta, the buffer is dropped
    Versus `Module.to_empty`: one allocation instead of one per tensor, one copy to or from
    the host instead of hundreds, and the freed memory returns to the device as one block.
    Parameters are replaced by new `nn.Parameter` objects on every move (a tensor cannot
    change to or from meta in place); ties are kept. Buffers are not managed here.
    """

    def __init__(self, module: nn.Module, *, exclude: Iterable[nn.Module] = ()) -> None:
        """`exclude`: submodules whose parameters live elsewhere (e.g. layers streamed from host memory)."""
        self.module = module
        skip = {id(p) for m in exclude for p in m.parameters()}
        by_id: dict[int, _Slot] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for attr, param in mod._parameters.items():
                if param is None or id(param) in skip:
                    continue
                slot = by_id.setdefault(id(param), _Slot(f"{mod_name}.{attr}".lstrip("."), [], param.shape,
                                                         param.dtype, param.requires_grad))
                if (mod, attr) not in slot.owners:
                    slot.owners.append((mod, attr))
        self.slots = list(by_id.values())
        self.offsets, self.nbytes = pack((s.shape, s.dtype) for s in self.slots)
        self.buffer: torch.Tensor | None = None
        # With fixed addresses (CUDA VMM) the buffer's range is reserved once and only its physical
        # memory comes and goes: parameters land at the same addresses after every materialize.
        self.fixed: FixedBuffer | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("meta") if self.buffer is None else self.buffer.device

    def bytes_by_dtype(self) -> dict[str, int]:
        """The parameters' bytes per dtype name (e.g. {"float8_e4m3fn": ..., "bfloat16": ...}), alignment excluded."""
        out: dict[str, int] = {}
        for slot in self.slots:
            name = str(slot.dtype).removeprefix("torch.")
            out[name] = out.get(name, 0) + tensor_nbytes(slot.shape, slot.dtype)
        return out

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's view into a uint8 buffer of this layout (device or host)."""
        return views(buffer, ((s.shape, s.dtype) for s in self.slots), self.offsets)

    def _point(self, tensors: list[torch.Tensor]) -> None:
        self.install([nn.Parameter(t, requires_grad=s.requires_grad) for s, t in zip(self.slots, tensors)])

    def materialize(self, device: torch.device | str, *, fixed_address: bool = False, pin: bool = False,
                    ) -> torch.Tensor:
        """Allocate the buffer on `device` (contents uninitialised) and point the parameters at it.

        `fixed_address` (CUDA): the buffer is a FixedBuffer whose address every later materialize
        reuses. `pin` (host buffers): page-locked, so copies to a GPU run at full speed and asynchronously.
        Raises torch.OutOfMemoryError with nothing changed if the allocation fails.
        """
        assert self.buffer is None, f"parameters already live on {self.buffer.device}"
        if fixed_address and self.fixed is None:
            self.fixed = FixedBuffer(self.nbytes, torch.device(device))
        if self.fixed is not None:
            self.fixed.map()  # no-op where it is still mapped (the first materialize)
            buffer = self.fixed.tensor
        elif pin:
            assert torch.device(device).type == "cpu", f"pin applies to host buffers, not {device}"
            buffer = pinned_empty(self.nbytes)  # exact size: torch's pinned pool rounds to 2**k
        else:
            buffer = empty_own_segment(self.nbytes, dtype=torch.uint8, device=device)
        self.buffer = buffer
        self._point(self.views(buffer))
        return buffer

    def parameters(self) -> list[nn.Parameter]:
        """The current parameter objects, one per slot (what `_point` last installed)."""
        return [mod._parameters[attr] for mod, attr in (s.owners[0] for s in self.slots)]

    def install(self, params: list[nn.Parameter]) -> None:
        """Make every owner of each slot hold the given parameter object (made by the caller, e.g. once)."""
        for slot, param in zip(self.slots, params):
            for mod, attr in slot.owners:
                mod._parameters[attr] = param

    def adopt(self) -> torch.Tensor:
        """Move parameters that live anywhere (one allocation each) into a fresh flat buffer, same device."""
        current = self.parameters()
        device = current[0].device
        buffer = empty_own_segment(self.nbytes, dtype=torch.uint8, device=device)
        with torch.no_grad():
            for view, param in zip(self.views(buffer), current):
                view.copy_(param)
        self.buffer = buffer
        self._point(self.views(buffer))
        return buffer

    def to_meta(self) -> int:
        """Point every parameter at meta and drop the buffer (a fixed one: unmap it); returns the bytes it held."""
        freed = 0 if self.buffer is None else self.buffer.numel()
        self._point([torch.empty(s.shape, dtype=s.dtype, device="meta") for s in self.slots])
        self.buffer = None
        if self.fixed is not None:
            self.fixed.unmap()
        return freed

    def close(self) -> None:
        """to_meta, and give back a fixed buffer's address range too."""
        self.to_meta()
        if self.fixed is not None:
            self.fixed.close()
            self.fixed = None


def materialize_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Give every buffer still on meta real (uninitialised) storage on `device`."""
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device.type == "meta":
                mod._buffers[name] = torch.empty_like(buf, device=device)


def materialize_parameters(module: nn.Module, device: torch.device | str) -> None:
    """Give every parameter still on meta real (uninitialised) storage on `device`, one allocation each; tied
    parameters stay tied, parameters elsewhere (e.g. streamed layers in host memory) stay where they are."""
    made: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, param in mod._parameters.items():
            if param is not None and param.device.type == "meta":
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device=device),
                                                   requires_grad=param.requires_grad)
                mod._parameters[name] = made[id(param)]
