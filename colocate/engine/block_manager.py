"""Bookkeeping of the KV cache pool's blocks: which are free, which a sequence holds."""

from __future__ import annotations

from collections import deque

from colocate.engine.sequence import Sequence


class BlockManager:
    """Free-list allocator over `num_blocks` blocks of `block_size` token slots.

    A running sequence holds blocks for all its tokens except the last sampled one, whose
    keys are written by the next decode step; `can_append` / `append_slot` make room for it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"{seq.seq_id=} already holds blocks"
        seq.block_table = [self.free_blocks.popleft() for _ in range(self.blocks_for(len(seq)))]

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= self.blocks_for(len(seq)) or bool(self.free_blocks)

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(len(seq)):
            seq.block_table.append(self.free_blocks.popleft())
