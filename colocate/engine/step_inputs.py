"""The tensors one step reads: token ids, positions, cache slots and block tables, built from scheduled sequences."""

from __future__ import annotations

import numpy as np
import torch

from colocate.engine.attention import AttentionMetadata
from colocate.engine.sampler import Penalties, SamplingTensors
from colocate.engine.sequence import Sequence


class StepInputs:
    """Builds the inputs of a prefill or decode step, and owns the static decode buffers graphs replay from.

    >>> inputs = StepInputs(device, block_size=16, max_blocks_per_seq=128, sink_block=pool.sink_block)
    >>> ids, positions, meta, last = inputs.prefill(seqs)
    >>> ids, positions, meta = inputs.decode(seqs)                 # eager: tensors sized to the batch
    >>> ids, positions, meta = inputs.decode_static(seqs, 16)      # graphs: written into the static buffers
    Padded rows of a static batch point at the sink block with context length 1, so they read and
    write nothing a live sequence owns.
    """

    def __init__(self, device: torch.device, *, block_size: int, max_blocks_per_seq: int, sink_block: int) -> None:
        self.device, self.block_size, self.max_blocks_per_seq = device, block_size, max_blocks_per_seq
        self.sink_block = sink_block
        self.static: torch.Tensor | None = None  # [4, max_batch] int64: ids, positions, slots, context lengths
        self.static_tables: torch.Tensor | None = None  # [max_batch, max_blocks_per_seq] int32

    # -- prefill ----------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Every token of every sequence, flattened; `last` indexes each sequence's final position."""
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

    # -- decode -----------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids, positions, slots, context_lens, tables = self._decode_lists(seqs)
        table = torch.from_numpy(self._table(tables, len(seqs), fill=0))
        to = dict(device=self.device, dtype=torch.long)
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=torch.tensor(slots, **to), block_tables=table.to(self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            max_context_len=max(context_lens))
        return torch.tensor(input_ids, **to), torch.tensor(positions, **to), meta

    def allocate_static(self, max_batch_size: int) -> None:
        """The buffers decode graphs read from; their addresses are baked into the graphs."""
        n = max_batch_size
        self.static = torch.zeros(4, n, dtype=torch.long, device=self.device)
        self.static[2].fill_(self.sink_block * self.block_size)
        self.static[3].fill_(1)
        self.static_tables = torch.full((n, self.max_blocks_per_seq), self.sink_block, dtype=torch.int32,
                                        device=self.device)

    def free_static(self) -> None:
        self.static = self.static_tables = None

    def static_args(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The first `batch_size` rows of the static buffers, as a decode step's (ids, positions, metadata)."""
        assert self.static is not None and self.static_tables is not None, "allocate_static first"
        bs = batch_size
        meta = AttentionMetadata(is_prefill=False, slot_mapping=self.static[2, :bs],
                                 block_tables=self.static_tables[:bs], context_lens=self.static[3, :bs],
                                 max_context_len=self.max_blocks_per_seq * self.block_size)
        return self.static[0, :bs], self.static[1, :bs], meta

    def decode_static(self, seqs: list[Sequence], batch_size: int) -> None:
        """Write `seqs`, padded to `batch_size` rows, into the static buffers (one copy for the four rows)."""
        pad = batch_size - len(seqs)
        input_ids, positions, slots, context_lens, tables = self._decode_lists(seqs)
        rows = torch.tensor([input_ids + [0] * pad, positions + [0] * pad,
                             slots + [self.sink_block * self.block_size] * pad, context_lens + [1] * pad],
                            dtype=torch.long)
        table = torch.from_numpy(self._table(tables, batch_size, fill=self.sink_block))
        self.static[:, :batch_size].copy_(rows, non_blocking=True)
        self.static_tables[:batch_size].copy_(table, non_blocking=True)

    # -- sampling ---------------------------------------------------------------------------
    def sampling(self, seqs: list[Sequence]) -> SamplingTensors:
        ps = [seq.params for seq in seqs]
        dev = self.device
        num_top = max(p.top_logprobs for p in ps)
        penalties = self._penalties(seqs)
        if all(p.is_greedy for p in ps):  # greedy reads none of the per-row tensors: skip their copies
            empty = torch.empty(0, device=dev)
            return SamplingTensors(empty, empty, empty, empty, empty, True, False, False, num_top, penalties)
        return SamplingTensors(
            temperatures=torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev),
            top_k=torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev),
            top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
            seeds=torch.tensor([seq.seed for seq in seqs], dtype=torch.long, device=dev),
            steps=torch.tensor([seq.num_generated for seq in seqs], dtype=torch.long, device=dev),
            is_all_greedy=False,
            needs_top_k=any(p.top_k > 0 and not p.is_greedy for p in ps),
            needs_top_p=any(p.top_p < 1 and not p.is_greedy for p in ps),
            num_top_logprobs=num_top,
            penalties=penalties,
        )

    def _penalties(self, seqs: list[Sequence]) -> Penalties | None:
        """The penalised rows and every token they generated so far (None: no row has a penalty)."""
        rows = [i for i, seq in enumerate(seqs) if seq.params.has_penalties]
        if not rows:
            return None
        token_rows, token_ids = [], []
        for j, i in enumerate(rows):
            generated = seqs[i].token_ids[seqs[i].num_prompt_tokens:]
            token_rows.extend([j] * len(generated))
            token_ids.extend(generated)
        to = dict(device=self.device, dtype=torch.long)
        return Penalties(
            rows=torch.tensor(rows, **to),
            presence=torch.tensor([seqs[i].params.presence_penalty for i in rows], dtype=torch.float32,
                                  device=self.device),
            frequency=torch.tensor([seqs[i].params.frequency_penalty for i in rows], dtype=torch.float32,
                                   device=self.device),
            token_rows=torch.tensor(token_rows, **to), token_ids=torch.tensor(token_ids, **to))

    # -- host lists -------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[i // bs] * bs + i % bs for i in range(start, end)]

    def _decode_lists(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
        """Last token, its position, its slot, context length, block table (unpadded)."""
        input_ids = [seq.token_ids[-1] for seq in seqs]
        positions = [len(seq) - 1 for seq in seqs]
        slots = [self._slots(seq, len(seq) - 1, len(seq))[0] for seq in seqs]
        context_lens = [len(seq) for seq in seqs]
        return input_ids, positions, slots, context_lens, [seq.block_table for seq in seqs]

    def _table(self, tables: list[list[int]], num_rows: int, fill: int) -> np.ndarray:
        table = np.full((num_rows, self.max_blocks_per_seq), fill, dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        return table
