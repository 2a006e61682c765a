"""Decode CUDA graphs: one per batch size, replayed on the static input buffers padded to that size."""

from __future__ import annotations

from collections.abc import Callable

import torch

from colocate.engine.attention import AttentionMetadata
from colocate.engine.sequence import Sequence
from colocate.engine.step_inputs import StepInputs

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, list[int] | None], torch.Tensor]


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    """Captured decode steps (model forward + logits) for a set of batch sizes.

    >>> graphs = DecodeGraphs(runner.forward, inputs, max_batch_size=64, device=device)
    >>> logits = graphs.replay(seqs)          # [len(seqs), vocab]
    The graphs bake in the addresses of the weights, the KV cache and the static inputs: anything
    that moves them (weights materialised anew on resume, a new KV cache) must drop these graphs
    and capture new ones.
    """

    def __init__(self, forward: Forward, inputs: StepInputs, *, max_batch_size: int, device: torch.device) -> None:
        self.forward, self.inputs, self.device = forward, inputs, device
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        free_before = torch.cuda.mem_get_info(device)[0]
        inputs.allocate_static(self.max_batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()
        self.pool_bytes = max(free_before - torch.cuda.mem_get_info(device)[0], 0)  # static inputs + graph pool

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            args = (*self.inputs.static_args(bs), None)
            self.forward(*args)  # warm-up: Triton compilation, cuBLAS handles, outside capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a status request reading free memory) do not break the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[bs] = self.forward(*args)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def replay(self, seqs: list[Sequence]) -> torch.Tensor:
        bs = next(b for b in self.sizes if b >= len(seqs))
        self.inputs.decode_static(seqs, bs)
        self.graphs[bs].replay()
        return self.logits[bs][: len(seqs)]
