"""Continuous batching: admit waiting sequences by KV capacity, decode the running ones, preempt when full."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from colocate.engine.block_manager import BlockManager
from colocate.engine.sequence import FinishReason, Sequence, SequenceStatus, StepOutput


@dataclass
class ScheduledBatch:
    """One step: `seqs` are the model's rows; a prefill may also start `forks`, responses that share a row's
    prompt (row index, response), sampled from that row's logits after `copies` (source block, destination
    block) give each its own copy of the prompt's partial last block."""

    seqs: list[Sequence]
    is_prefill: bool
    forks: list[tuple[int, Sequence]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def sampled(self) -> list[Sequence]:
        """Every sequence that gets a token this step, in the order of the step's output."""
        return self.seqs + [child for _, child in self.forks]


class Scheduler:
    """Prefill first (as many waiting sequences as fit), otherwise one decode step for all running.

    When the pool cannot hold the next token of every running sequence, the newest running
    sequence is preempted: its blocks are freed and it returns to the front of the queue, to
    be prefilled again (prompt plus what it generated so far) when room frees up. Nothing is
    dropped: a sequence leaves only by finishing.
    """

    def __init__(self, *, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: list[int]) -> None:
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        """Whether anything is queued or running (every step asks; a waiting group always has its leader queued)."""
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + sum(not c.is_finished for seq in self.waiting
                                                           for c in seq.siblings)

    def add(self, seq: Sequence) -> None:
        leader = seq.leader
        if leader is not None and seq in leader.siblings:
            if not leader.is_finished:
                return  # queued with its leader, whose prefill starts it
            leader.siblings.remove(seq)  # its leader was cancelled while held: it runs on its own
            seq.leader = None
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        prefill: list[Sequence] = []
        batch = ScheduledBatch(prefill, is_prefill=True)
        num_tokens = num_seqs = 0
        while self.waiting and len(self.running) + num_seqs < self.max_num_seqs:
            seq = self.waiting[0]
            if num_tokens + len(seq) > self.max_num_batched_tokens or not self.block_manager.can_allocate(seq):
                break
            if seq.siblings and not self._group_fits(seq, num_seqs) and (self.running or prefill):
                break  # wait for room for the whole group, so that it shares one prefill
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            prefill.append(seq)
            num_tokens += len(seq)
            num_seqs += 1
            if seq.siblings:
                room = self.max_num_seqs - len(self.running) - num_seqs
                num_seqs += self._fork(seq, len(prefill) - 1, batch, room=room)
        if prefill:
            self.running.extend(batch.sampled)
            return batch
        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:  # preempted below to make room for an older one
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slot(seq)
                decode.append(seq)
        return ScheduledBatch(decode, is_prefill=False) if decode else None

    def _group_fits(self, leader: Sequence, num_seqs: int) -> bool:
        """Whether the leader and its unstarted siblings (as many as a batch holds) fit now, slots and blocks."""
        group = min(1 + sum(not c.is_finished for c in leader.siblings), self.max_num_seqs)
        bm = self.block_manager
        blocks = bm.blocks_for(len(leader)) + (group - 1) * bm.fork_cost(leader)
        return len(self.running) + num_seqs + group <= self.max_num_seqs and blocks <= bm.num_free_blocks

    def _fork(self, leader: Sequence, row: int, batch: ScheduledBatch, *, room: int) -> int:
        """Start as many of `leader`'s siblings as the batch and the pool have room for, sharing its prompt;
        the others go to the queue's front as requests of their own. Returns how many started."""
        siblings, leader.siblings = leader.siblings, []
        rest = []
        for child in siblings:
            child.leader = None
            if child.is_finished:  # cancelled while the engine held it
                continue
            if room > 0 and self.block_manager.fork_cost(leader) <= self.block_manager.num_free_blocks:
                copy = self.block_manager.fork(leader, child)
                if copy is not None:
                    batch.copies.append(copy)
                child.status = SequenceStatus.RUNNING
                batch.forks.append((row, child))
                room -= 1
            else:
                rest.append(child)
        self.waiting.extendleft(reversed(rest))  # first in the queue, in their order
        return len([c for c in siblings if not c.is_finished]) - len(rest)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], out: StepOutput) -> list[Sequence]:
        """Append each sequence's new token; finish those that stop. Returns the finished ones."""
        finished = []
        for i, (seq, token, logprob) in enumerate(zip(seqs, out.token_ids, out.logprobs)):
            if seq.abort_requested:  # cancelled while this step ran: its token is dropped
                self.abort(seq)
                finished.append(seq)
                continue
            if i in out.prompt_logprobs:
                seq.prompt_logprobs = out.prompt_logprobs[i]
            seq.append(token, logprob, out.top_logprobs[i])
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self.block_manager.free(seq)
                seq.finish(reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_generated >= params.max_new_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def abort(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Finish one queued or running sequence (not one in a step under way) with finish_reason="abort"."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            index = self.waiting.index(seq)
            del self.waiting[index]
            alive, seq.siblings = [c for c in seq.siblings if not c.is_finished], []
            if alive:  # the next response leads the ones still to start
                heir, *rest = alive
                heir.leader, heir.siblings = None, rest
                for child in rest:
                    child.leader = heir
                self.waiting.insert(index, heir)
        elif seq.leader is not None and seq in seq.leader.siblings:
            seq.leader.siblings.remove(seq)
            seq.leader = None
        seq.finish("abort", error)

    def abort_all(self) -> list[Sequence]:
        """Finish every queued and running sequence with finish_reason="abort"."""
        aborted = list(self.running) + list(self.waiting) + [c for seq in self.waiting for c in seq.siblings
                                                              if not c.is_finished]
        for seq in self.waiting:
            seq.siblings = []
        for seq in self.running:
            self.block_manager.free(seq)
        for seq in aborted:
            seq.finish("abort")
        self.running.clear()
        self.waiting.clear()
        return aborted
