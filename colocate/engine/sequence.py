"""A request's life in the engine: tokens so far, its KV blocks, and its state."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from colocate.engine.config import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds blocks for every token but the last sampled one
    FINISHED = "finished"


@dataclass
class GenerationOutput:
    """What `Engine.generate` returns per prompt.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution it was
    sampled from (temperature, top-k and top-p applied); for greedy requests, under the
    unscaled softmax. None when `SamplingParams.logprobs` is False.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    text: str | None = None


class Sequence:
    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.seq_id = seq_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = list(prompt_token_ids)  # prompt + generated
        self.logprobs: list[float] = []
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None  # why an aborted sequence failed, raised to whoever waits on it
        self.abort_requested = False  # cancelled while its step ran; the step's postprocess finishes it
        self.held_until: float | None = None  # while held by a pause: when it gives up (monotonic seconds)
        self.on_finish: Callable[[Sequence], None] | None = None  # called once, on the engine's notifier thread
        self.done = threading.Event()

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

    def output(self) -> GenerationOutput:
        assert self.finish_reason is not None, f"{self.seq_id=} is not finished"
        return GenerationOutput(
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=self.token_ids[self.num_prompt_tokens:],
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            finish_reason=self.finish_reason,
        )
