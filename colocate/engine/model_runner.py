"""Runs the model for a scheduled batch: builds inputs, owns the KV cache tensor, samples."""

from __future__ import annotations

import numpy as np
import torch

from colocate.engine.attention import AttentionMetadata, PagedAttention
from colocate.engine.config import EngineConfig
from colocate.engine.cuda_graph import DecodeGraphs
from colocate.engine.sampler import SamplingTensors, sample
from colocate.engine.sequence import Sequence
from colocate.model import CausalLM


class ModelRunner:
    """Owns the model, the KV cache and the decode graphs of one engine.

    The KV cache is one tensor [2, num_layers, num_blocks + 1, block_size, Hkv, D]; the extra
    last block is a sink that padded rows of a captured graph write into, so padding never
    touches a live sequence's keys.
    """

    def __init__(self, config: EngineConfig, model: CausalLM, num_blocks: int) -> None:
        self.config = config
        self.model = model
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        mc = model.config
        self.attention = PagedAttention(
            self.allocate_kv_cache(), scale=mc.head_dim ** -0.5, use_triton=self.device.type == "cuda")
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.enable_cuda_graph:
            self.capture_graphs()

    # -- memory ---------------------------------------------------------------------------
    def kv_cache_shape(self) -> tuple[int, ...]:
        mc = self.model.config
        return (2, mc.num_hidden_layers, self.num_blocks + 1, self.block_size, mc.num_key_value_heads, mc.head_dim)

    def allocate_kv_cache(self) -> torch.Tensor:
        return torch.empty(self.kv_cache_shape(), dtype=self.dtype, device=self.device)

    def kv_cache_nbytes(self) -> int:
        return torch.Size(self.kv_cache_shape()).numel() * self.dtype.itemsize

    @staticmethod
    def kv_bytes_per_block(config: EngineConfig, model: CausalLM) -> int:
        mc = model.config
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return 2 * mc.num_hidden_layers * config.block_size * mc.num_key_value_heads * mc.head_dim * itemsize

    def capture_graphs(self) -> None:
        max_bs = min(self.config.cuda_graph_max_batch_size or self.config.max_num_seqs, self.config.max_num_seqs)
        self.graphs = DecodeGraphs(self, max_bs)

    # -- inputs ---------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[i // bs] * bs + i % bs for i in range(start, end)]

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids, positions, slots, cu_seqlens, last = [], [], [], [0], []
        for seq in seqs:
            n = len(seq)
            input_ids.extend(seq.token_ids)
            positions.extend(range(n))
            slots.extend(self._slots(seq, 0, n))
            cu_seqlens.append(cu_seqlens[-1] + n)
            last.append(cu_seqlens[-1] - 1)
        to = dict(device=self.device, dtype=torch.long)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.tensor(slots, **to), cu_seqlens=cu_seqlens)
        return torch.tensor(input_ids, **to), torch.tensor(positions, **to), meta, last

    def decode_inputs(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
        """Host lists: last token, its position, its slot, context length, block table (unpadded)."""
        input_ids = [seq.token_ids[-1] for seq in seqs]
        positions = [len(seq) - 1 for seq in seqs]
        slots = [self._slots(seq, len(seq) - 1, len(seq))[0] for seq in seqs]
        context_lens = [len(seq) for seq in seqs]
        return input_ids, positions, slots, context_lens, [seq.block_table for seq in seqs]

    def block_table_array(self, tables: list[list[int]], num_rows: int, fill: int) -> np.ndarray:
        table = np.full((num_rows, self.max_blocks_per_seq), fill, dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        return table

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids, positions, slots, context_lens, tables = self.decode_inputs(seqs)
        table = torch.from_numpy(self.block_table_array(tables, len(seqs), fill=0))
        to = dict(device=self.device, dtype=torch.long)
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=torch.tensor(slots, **to), block_tables=table.to(self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            max_context_len=max(context_lens))
        return torch.tensor(input_ids, **to), torch.tensor(positions, **to), meta

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        ps = [seq.params for seq in seqs]
        dev = self.device
        if all(p.is_greedy for p in ps):  # greedy reads none of the per-row tensors: skip their copies
            empty = torch.empty(0, device=dev)
            return SamplingTensors(empty, empty, empty, empty, empty, True, False, False)
        return SamplingTensors(
            temperatures=torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev),
            top_k=torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev),
            top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
            seeds=torch.tensor([seq.seed for seq in seqs], dtype=torch.long, device=dev),
            steps=torch.tensor([seq.num_generated for seq in seqs], dtype=torch.long, device=dev),
            is_all_greedy=all(p.is_greedy for p in ps),
            needs_top_k=any(p.top_k > 0 and not p.is_greedy for p in ps),
            needs_top_p=any(p.top_p < 1 and not p.is_greedy for p in ps),
        )

    # -- run ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float]]:
        if is_prefill:
            input_ids, positions, meta, last = self.prepare_prefill(seqs)
            logits = self.forward(input_ids, positions, meta, last)
        elif self.graphs is not None and len(seqs) <= self.graphs.max_batch_size:
            logits = self.graphs.replay(seqs)
        else:
            input_ids, positions, meta = self.prepare_decode(seqs)
            logits = self.forward(input_ids, positions, meta, None)
        tokens, logprobs = sample(logits, self.sampling_tensors(seqs))
        # One device-to-host transfer (one sync) for both; token ids are exact in float64.
        host = torch.stack((tokens.double(), logprobs.double())).cpu()
        return [int(t) for t in host[0].tolist()], host[1].tolist()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last: list[int] | None) -> torch.Tensor:
        self.attention.metadata = meta
        try:
            hidden = self.model(input_ids, positions, self.attention)
        finally:
            self.attention.metadata = None
        if last is not None:
            hidden = hidden[torch.tensor(last, device=hidden.device)]
        return self.model.compute_logits(hidden)
