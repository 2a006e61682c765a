"""Decode CUDA graphs: one per batch size, replayed on static input tensors padded to that size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from colocate.engine.attention import AttentionMetadata
from colocate.engine.sequence import Sequence

if TYPE_CHECKING:
    from colocate.engine.model_runner import ModelRunner


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    """Captured decode steps (model forward + logits) for a set of batch sizes.

    The graphs bake in the addresses of the weights, the KV cache and the static inputs:
    anything that moves them (a `to_empty` on resume, a new KV cache) must drop these graphs
    and capture new ones. Padded rows point at the runner's sink block, context length 1.
    """

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        dev = runner.device
        free_before = torch.cuda.mem_get_info(dev)[0]
        self.sink_block = runner.num_blocks  # the extra block allocate_kv_cache adds
        n = self.max_batch_size
        # ids, positions, slots and context lengths in one tensor: one copy per step fills them all.
        self.static = torch.zeros(4, n, dtype=torch.long, device=dev)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self.static.unbind(0)
        self.slot_mapping.fill_(self.sink_block * runner.block_size)
        self.context_lens.fill_(1)
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), self.sink_block, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self._capture()
        self.pool_bytes = max(free_before - torch.cuda.mem_get_info(dev)[0], 0)  # static inputs + graph pool

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:bs],
                                 block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                                 max_context_len=self.runner.max_blocks_per_seq * self.runner.block_size)

    @torch.inference_mode()
    def _capture(self) -> None:
        runner = self.runner
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            args = (self.input_ids[:bs], self.positions[:bs], self._metadata(bs), None)
            runner.forward(*args)  # warm-up: Triton compilation, cuBLAS handles, outside capture
            torch.cuda.synchronize(runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = runner.forward(*args)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(runner.device)

    def replay(self, seqs: list[Sequence]) -> torch.Tensor:
        n = len(seqs)
        bs = next(b for b in self.sizes if b >= n)
        input_ids, positions, slots, context_lens, tables = self.runner.decode_inputs(seqs)
        pad = bs - n
        sink_slot = self.sink_block * self.runner.block_size
        rows = torch.tensor([input_ids + [0] * pad, positions + [0] * pad, slots + [sink_slot] * pad,
                             context_lens + [1] * pad], dtype=torch.long)
        table = torch.from_numpy(self.runner.block_table_array(tables, bs, fill=self.sink_block))
        self.static[:, :bs].copy_(rows, non_blocking=True)
        self.block_tables[:bs].copy_(table, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
