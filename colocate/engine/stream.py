"""A request's progress by output index (prompt-major, n per prompt): new tokens as steps append them, and
each output as it finishes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from colocate.engine.config import SamplingParams
from colocate.engine.request import Prompt
from colocate.engine.sequence import GenerationOutput, Sequence, TokenDelta

if TYPE_CHECKING:  # the engine imports this module's callers, not the reverse
    from colocate.engine.engine import Engine


@dataclass
class StreamEvent:
    """One piece of a streamed request: new tokens of output `index` (prompt-major), or that output once finished."""

    index: int
    delta: TokenDelta | None = None
    output: GenerationOutput | None = None


def submit_streaming(engine: Engine, prompts: Prompt | Seq[Prompt],
                     params: SamplingParams | Seq[SamplingParams] | None, *,
                     on_delta: Callable[[int, TokenDelta], None] | None = None,
                     on_finish: Callable[[int, Sequence], None] | None = None,
                     on_done: Callable[[list[Sequence]], None] | None = None) -> list[Sequence]:
    """`engine.submit` with callbacks by output index; returns the sequences at once.

    >>> submit_streaming(engine, ["a", "b"], params, on_delta=lambda i, d: print(i, d.token_ids),
    ...                  on_done=lambda seqs: print("all finished"))
    On the engine's notifier thread, in order: `on_delta(i, delta)` for each step that added tokens
    to prompt i (only when given: a request without it pays nothing per token), `on_finish(i, seq)`
    once prompt i finished, and `on_done(seqs)` once after the last. A delta may carry several
    tokens when the callbacks lag the steps; the first one of a prompt carries its prompt logprobs.
    """
    lock = threading.Lock()  # callbacks may start before submit returns: they wait for the index
    index: dict[int, int] = {}
    num_sent: list[int] = []
    remaining = [0]
    seqs: list[Sequence] = []

    def update(seq: Sequence) -> None:
        with lock:
            i = index[seq.seq_id]
        delta = seq.delta(num_sent[i])
        if delta.token_ids:
            num_sent[i] += len(delta.token_ids)
            on_delta(i, delta)

    def finish(seq: Sequence) -> None:
        with lock:
            i = index[seq.seq_id]
        if on_finish is not None:
            on_finish(i, seq)
        with lock:
            remaining[0] -= 1
            is_last = remaining[0] == 0
        if is_last and on_done is not None:
            on_done(seqs)

    with lock:
        seqs.extend(engine.submit(prompts, params, on_finish=finish, on_update=update if on_delta else None))
        index.update({seq.seq_id: i for i, seq in enumerate(seqs)})
        num_sent.extend([0] * len(seqs))
        remaining[0] = len(seqs)
    return seqs
