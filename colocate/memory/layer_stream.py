"""Layers whose weights live in pinned host memory and stream to the device for each forward, with prefetch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from colocate.memory.device import empty_own_segment
from colocate.memory.flat import FlatParameters, materialize_buffers, materialize_parameters


def check_fraction(name: str, value: object) -> None:
    """ValueError unless `value` is a number from 0 to 1 (the share of a model's layers to stream)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name}={value!r} must be a fraction of the layers from 0 to 1")


def spread_layers(num_layers: int, fraction: float) -> list[int]:
    """The `round(fraction * num_layers)` layers to keep in host memory, spread evenly over the stack.

    Spread rather than the last k: each streamed layer then has resident layers before it whose compute
    hides its copy, and the link is busy through the whole forward instead of only its tail. For half of
    24 layers: 1, 3, 5, ... ; for a quarter: 3, 6, 10, 13, 17, 20.
    """
    check_fraction("fraction", fraction)
    k = round(fraction * num_layers)
    return [(j + 1) * num_layers // (k + 1) for j in range(k)]


def stream_layers(decoder: nn.Module, device: torch.device | str, fraction: float, *, prefetch: int = 2,
                  ) -> LayerStreamer | None:
    """Put `fraction` of `decoder.layers` (spread) in pinned host memory and make the decoder's forward stream
    them (`decoder.layer_source`); None when no layer is chosen. The decoder may be on meta: the streamed
    layers get host buffers here, the caller materialises the rest on the device."""
    offloaded = spread_layers(len(decoder.layers), fraction)
    if not offloaded:
        return None
    streamer = LayerStreamer(decoder.layers, offloaded, torch.device(device), prefetch=prefetch)
    streamer.materialize()
    decoder.layer_source = streamer.run
    return streamer


def place_streamed(model: nn.Module, decoder: nn.Module, device: torch.device | str, fraction: float,
                   ) -> LayerStreamer | None:
    """A `load_model` materialize step for a model built on meta: `fraction` of the decoder's layers streamed
    (`stream_layers`), every other parameter and buffer allocated on `device`, one tensor each."""
    streamer = stream_layers(decoder, device, fraction)
    materialize_parameters(model, device)
    materialize_buffers(model, device)
    return streamer


class LayerStreamer:
    """Some layers' parameters in pinned host memory (ordinary parameters whose `.device` is cpu), and a ring of
    device staging slots they are copied into, `prefetch` layers ahead, while earlier layers compute.

    >>> streamer = LayerStreamer(model.model.layers, spread_layers(24, 0.5), device, prefetch=2)
    >>> streamer.materialize()                   # pinned host buffers (one per layer) and the staging slots
    >>> load_weights(model, tensors)             # offloaded layers are written in host memory
    >>> for layer in streamer.run(model.model.layers): x = layer(x)      # the forward
    While a streamed layer runs, its modules hold views into its staging slot; before and after, the host
    parameters. The copies run on a side stream; events order each layer's compute after its copy and
    each slot's next copy after the compute that read it. Everything is queued on streams, so a decode
    step captured in a CUDA graph captures the copies too (pinned sources, fixed staging addresses). On
    CPU the slots are host memory and the copies are plain copies: same code, same results.
    """

    def __init__(self, layers: nn.ModuleList, offloaded: Sequence[int], device: torch.device, *,
                 prefetch: int = 2) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"weights_prefetch={prefetch!r} must be an integer >= 1 (staging slots; 1: no overlap "
                             "between a streamed layer's copy and the layer before it)")
        if not offloaded or len(set(offloaded)) != len(offloaded) or not all(0 <= i < len(layers) for i in offloaded):
            raise ValueError(f"offloaded layers {list(offloaded)!r} must be distinct indices of {len(layers)} layers")
        self.device, self.indices = torch.device(device), sorted(offloaded)
        self.layers = [layers[i] for i in self.indices]
        self.position = {i: q for q, i in enumerate(self.indices)}  # layer index -> its place among the streamed
        self.flats = [FlatParameters(layer) for layer in self.layers]
        self.depth = min(prefetch, len(self.indices))
        self.slot_bytes = max(f.nbytes for f in self.flats)
        self.staging: torch.Tensor | None = None  # [depth, slot_bytes] uint8 on the device
        self._host: list[list[nn.Parameter]] = []
        self._staged: list[list[list[nn.Parameter]]] = []  # [layer][slot] -> parameters viewing that slot
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() for _ in range(self.depth)] if cuda else []
        self.free = [torch.cuda.Event() for _ in range(self.depth)] if cuda else []

    def parameters(self) -> list[nn.Parameter]:
        """The streamed layers' (host) parameters: what an offload of the whole model must leave alone."""
        return [p for layer in self.layers for p in layer.parameters()]

    @property
    def host_bytes(self) -> int:
        return sum(f.nbytes for f in self.flats if f.buffer is not None)

    @property
    def staging_bytes(self) -> int:
        return 0 if self.staging is None else self.staging.numel()

    def materialize(self) -> None:
        """Pinned host buffers for the offloaded layers (contents uninitialised) and the staging slots."""
        pin = self.device.type == "cuda"
        for flat in self.flats:
            if flat.buffer is None:
                flat.materialize("cpu", pin=pin)
        self._host = [flat.parameters() for flat in self.flats]
        self.allocate_staging()

    def allocate_staging(self) -> int:
        """The device slots (after `free_staging`); returns their bytes."""
        if self.staging is None:
            self.staging = empty_own_segment((self.depth, self.slot_bytes), dtype=torch.uint8, device=self.device)
            self._staged = [[[nn.Parameter(v, requires_grad=False) for v in flat.views(self.staging[s])]
                             for s in range(self.depth)] for flat in self.flats]
        return self.staging_bytes

    def free_staging(self) -> int:
        freed, self.staging, self._staged = self.staging_bytes, None, []
        return freed

    def close(self) -> None:
        """Free the staging slots and the host buffers; the offloaded parameters go to meta."""
        self.free_staging()
        for flat in self.flats:
            flat.to_meta()
        self._host = []

    def run(self, layers: nn.ModuleList) -> Iterator[nn.Module]:
        """The layers in order, each streamed one holding its device weights while the caller runs it."""
        assert self.staging is not None, "staging slots are freed: allocate_staging() before a forward"
        current = torch.cuda.current_stream(self.device) if self.copy_stream is not None else None
        if current is not None:
            # Earlier work on the compute stream (the last forward reading the slots, weight writes into the
            # host buffers) comes before any copy of this forward.
            self.copy_stream.wait_stream(current)
        for q in range(self.depth):
            self._fetch(q, after_free=False)
        for i, layer in enumerate(layers):
            q = self.position.get(i)
            if q is None:
                yield layer
                continue
            slot = q % self.depth
            if current is not None:
                current.wait_event(self.ready[slot])
            self.flats[q].install(self._staged[q][slot])
            try:
                yield layer
            finally:
                self.flats[q].install(self._host[q])
            if current is not None:
                self.free[slot].record(current)
            if q + self.depth < len(self.indices):
                self._fetch(q + self.depth, after_free=True)
        if current is not None:
            current.wait_stream(self.copy_stream)  # a capture must end with the side stream joined back

    def _fetch(self, q: int, *, after_free: bool) -> None:
        slot, flat = q % self.depth, self.flats[q]
        dst, src = self.staging[slot, :flat.nbytes], flat.buffer
        if self.copy_stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            if after_free:
                self.copy_stream.wait_event(self.free[slot])
            dst.copy_(src, non_blocking=True)
            self.ready[slot].record(self.copy_stream)
