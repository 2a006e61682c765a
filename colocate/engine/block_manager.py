"""Bookkeeping of the KV cache pool's blocks: which are free, which sequences hold each one."""

from __future__ import annotations

from collections import deque

from colocate.engine.sequence import Sequence


class BlockManager:
    """Free-list allocator over `num_blocks` blocks of `block_size` token slots, with reference counts.

    A running sequence holds blocks for all its tokens except the last sampled one, whose
    keys are written by the next decode step; `can_append` / `append_slot` make room for it.
    Responses to one prompt share its full blocks (`fork`): a block returns to the free list when
    the last sequence holding it lets go. Shared blocks are never written again (a sequence only
    writes past its own length), so only the prompt's partial last block is copied per response.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"{seq.seq_id=} already holds blocks"
        seq.block_table = [self._take() for _ in range(self.blocks_for(len(seq)))]

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= self.blocks_for(len(seq)) or bool(self.free_blocks)

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(len(seq)):
            seq.block_table.append(self._take())

    # -- shared prompts -------------------------------------------------------------------------
    def fork_cost(self, leader: Sequence) -> int:
        """Free blocks one more response to `leader`'s prompt needs: its own copy of a partial last block."""
        return 1 if len(leader) % self.block_size else 0

    def fork(self, leader: Sequence, child: Sequence) -> tuple[int, int] | None:
        """`child` shares `leader`'s full prompt blocks; returns (leader's partial block, child's copy) to copy
        once the leader's keys are written, or None when the prompt ends on a block boundary."""
        assert not child.block_table and len(child) == len(leader), "fork a response before either generates"
        full = len(leader) // self.block_size
        child.block_table = leader.block_table[:full]
        for block in child.block_table:
            self.refs[block] += 1
        if full == len(leader.block_table):
            return None
        copy = self._take()
        child.block_table.append(copy)
        return leader.block_table[full], copy

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.refs[block] = 1
        return block
