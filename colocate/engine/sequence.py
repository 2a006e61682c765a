"""A request's life in the engine: tokens so far, its KV blocks, and its state."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from colocate.engine.config import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
TopLogprobs = list[tuple[int, float]]  # (token id, logprob) of the k most likely tokens, most likely first


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds blocks for every token but the last sampled one
    FINISHED = "finished"


@dataclass
class GenerationOutput:
    """What `Engine.generate` returns per prompt.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution it was
    sampled from (penalties, temperature, top-k and top-p applied); for greedy requests, under
    the unscaled softmax (after penalties). None when `SamplingParams.logprobs` is False.
    `top_logprobs[i]` lists the `SamplingParams.top_logprobs` most likely tokens of that same
    distribution (tokens it cannot sample are left out). `prompt_logprobs[i]` is the
    log-probability of prompt token i given the ones before it under the model's plain softmax
    (None for the first), with `prompt_top_logprobs[i]` its alternatives.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    text: str | None = None
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None


@dataclass
class TokenDelta:
    """What a sequence generated since an earlier look: `Sequence.delta(start)`."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs] | None  # None unless the request asked for alternatives
    # In the first delta of a request that asked (SamplingParams.prompt_logprobs): see GenerationOutput.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None


@dataclass
class StepOutput:
    """One step's results, one entry per scheduled sequence (in the batch's order)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs | None]  # None for rows that did not ask
    # batch row -> (logprob per prompt token, None first; the top entries per prompt token)
    prompt_logprobs: dict[int, tuple[list[float | None], list[TopLogprobs]]] = field(default_factory=dict)


class Sequence:
    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.seq_id = seq_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = list(prompt_token_ids)  # prompt + generated
        # Appended last for each token (after token_ids and top_logprobs): its length counts the
        # tokens whose every field is written, which is what readers on other threads may use.
        self.logprobs: list[float] = []
        self.top_logprobs: list[TopLogprobs] = []  # per generated token, when params.top_logprobs > 0
        self.prompt_logprobs: tuple[list[float | None], list[TopLogprobs]] | None = None  # set by the first prefill
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None  # why an aborted sequence failed, raised to whoever waits on it
        self.abort_requested = False  # cancelled while its step ran; the step's postprocess finishes it
        self.held_until: float | None = None  # while held by a pause: when it gives up (monotonic seconds)
        self.on_finish: Callable[[Sequence], None] | None = None  # called once, on the engine's notifier thread
        # Called on the notifier thread after each step that appended a token (before on_finish for the last).
        self.on_update: Callable[[Sequence], None] | None = None
        self.done = threading.Event()
        # n > 1: the first response leads; the others wait in `siblings` until its prefill, then share its
        # prompt blocks (`leader` names the sequence whose prompt they share until then).
        self.leader: Sequence | None = None
        self.siblings: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.done.set()

    def append(self, token: int, logprob: float, top: TopLogprobs | None) -> None:
        self.token_ids.append(token)
        if top is not None:
            self.top_logprobs.append(top)
        self.logprobs.append(logprob)  # last: see __init__

    def delta(self, start: int) -> TokenDelta:
        """Generated tokens [start, n) with every field written; safe while the step thread appends."""
        n = len(self.logprobs)
        first = self.num_prompt_tokens
        prompt = self.prompt_logprobs if start == 0 else None  # written with the first token, before it
        return TokenDelta(token_ids=self.token_ids[first + start:first + n], logprobs=self.logprobs[start:n],
                          top_logprobs=self.top_logprobs[start:n] if self.params.top_logprobs else None,
                          prompt_logprobs=None if prompt is None else list(prompt[0]),
                          prompt_top_logprobs=None if prompt is None else list(prompt[1]))

    def output(self) -> GenerationOutput:
        assert self.finish_reason is not None, f"{self.seq_id=} is not finished"
        prompt = self.prompt_logprobs
        return GenerationOutput(
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=self.token_ids[self.num_prompt_tokens:],
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            finish_reason=self.finish_reason,
            top_logprobs=list(self.top_logprobs) if self.params.top_logprobs else None,
            prompt_logprobs=list(prompt[0]) if prompt is not None else None,
            prompt_top_logprobs=list(prompt[1]) if prompt is not None else None,
        )
