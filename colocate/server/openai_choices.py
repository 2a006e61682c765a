"""One OpenAI choice built from engine events: its tokens, text, logprobs and finish reason, whole or in pieces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from colocate.engine import GenerationOutput
from colocate.engine.sequence import TokenDelta, TopLogprobs
from colocate.model import Tokenizer
from colocate.server.text_stream import ChoiceText


@dataclass
class Piece:
    """What one event adds to a choice: text (after the prompt, when echoing), the tokens it completes."""

    text: str
    tokens: range  # indices of the completion tokens this piece completes
    prompt_text: str | None = None  # the echoed prompt, in the choice's first piece only
    finish_reason: str | None = None


class Choice:
    """A choice fed deltas as they stream (`add_delta`) and its output once it finished (`add_output`).

    >>> choice = Choice(0, tokenizer, stops=["\\n"], num_top=2, echo_ids=None)
    >>> piece = choice.add_output(output)        # the whole choice at once (non-streamed requests)
    Once a stop string appears the choice is finished ("stop") and later events change nothing.
    `num_top` is how many alternatives each token reports (None: no logprobs at all).
    """

    def __init__(self, index: int, tokenizer: Tokenizer | None, *, stops: list[str], num_top: int | None,
                 echo_ids: list[int] | None) -> None:
        self.index, self.tokenizer, self.num_top = index, tokenizer, num_top
        self.text = ChoiceText(tokenizer, stops=stops, needs_offsets=num_top is not None)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[TopLogprobs] = []
        self.echo_ids = echo_ids  # the prompt's ids when echoing; the prompt is released with the first piece
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_tops: list[TopLogprobs] | None = None
        self.finish_reason: str | None = None
        self._echo_pending = echo_ids is not None
        self.echo_len = 0  # characters of the echoed prompt, once released

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add_delta(self, delta: TokenDelta) -> Piece | None:
        if self.is_finished:
            return None
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_tops = delta.prompt_logprobs, delta.prompt_top_logprobs
        self._record(delta.token_ids, delta.logprobs, delta.top_logprobs)
        return self._piece(delta.token_ids, is_last=False, finish_reason=None)

    def add_output(self, out: GenerationOutput) -> Piece | None:
        if self.is_finished:
            return None
        if self.prompt_logprobs is None and out.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_tops = out.prompt_logprobs, out.prompt_top_logprobs
        new = out.token_ids[len(self.token_ids):]  # all of them when nothing streamed
        start = len(self.token_ids)
        self._record(new, (out.logprobs or [])[start:], None if out.top_logprobs is None else out.top_logprobs[start:])
        return self._piece(new, is_last=True, finish_reason=out.finish_reason)

    def _record(self, ids: list[int], logprobs: list[float], tops: list[TopLogprobs] | None) -> None:
        self.token_ids.extend(ids)
        self.logprobs.extend(logprobs)
        self.tops.extend(tops or [[] for _ in ids])

    def _piece(self, ids: list[int], *, is_last: bool, finish_reason: str | None) -> Piece | None:
        text, tokens = self.text.add(ids, is_last=is_last)
        if self.text.is_stopped:
            finish_reason = "stop"
        self.finish_reason = finish_reason
        prompt_text = None
        if self._echo_pending:
            self._echo_pending = False
            prompt_text = self.token_text(self.echo_ids)
            self.echo_len = len(prompt_text)
        if not text and not tokens and prompt_text is None and finish_reason is None:
            return None
        return Piece(text=text, tokens=tokens, prompt_text=prompt_text, finish_reason=finish_reason)

    # -- the pieces as OpenAI logprobs ------------------------------------------------------
    def token_text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "" if len(ids) != 1 else str(ids[0])
        return self.tokenizer.decode(ids)

    def completion_logprobs(self, piece: Piece) -> dict[str, Any] | None:
        """`logprobs` of a text_completion choice for the piece's tokens, after the echoed prompt's if it
        has it. Offsets count characters from the start of the choice's text (the echoed prompt included)."""
        if self.num_top is None:
            return None
        has_text = self.tokenizer is not None
        tokens, values, tops, offsets = [], [], [], []
        if piece.prompt_text is not None:
            for i, t in enumerate(self.echo_ids):
                tokens.append(self.token_text([t]))
                values.append(self.prompt_logprobs[i] if self.prompt_logprobs else None)
                tops.append(None if i == 0 or not self.prompt_tops else self._top_dict(self.prompt_tops[i]))
                offsets.append(len(self.token_text(self.echo_ids[:i])) if has_text else None)
        for i in piece.tokens:
            tokens.append(self.token_text([self.token_ids[i]]))
            values.append(self.logprobs[i])
            tops.append(self._top_dict(self.tops[i]))
            offsets.append(self.echo_len + (self.text.offsets[i - 1] if i else 0) if has_text else None)
        return {"tokens": tokens, "token_logprobs": [_finite(v) for v in values],
                "top_logprobs": tops if self.num_top else None, "text_offset": offsets if has_text else None}

    def chat_logprobs(self, piece: Piece) -> dict[str, Any] | None:
        """`logprobs` of a chat choice for the piece's tokens: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        if self.num_top is None:
            return None
        content = []
        for i in piece.tokens:
            entry = self._entry(self.token_ids[i], self.logprobs[i])
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in self.tops[i][:self.num_top]]
            content.append(entry)
        return {"content": content}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text([token])
        value = _finite(logprob)
        # OpenAI's logprob is a number: one the float range cannot hold is the most negative it can.
        return {"token": text, "logprob": -9999.0 if value is None else value, "bytes": list(text.encode("utf-8"))}

    def _top_dict(self, top: TopLogprobs) -> dict[str, float | None] | None:
        if not self.num_top:
            return None
        entries: dict[str, float | None] = {}
        for t, lp in top[:self.num_top]:  # two tokens that decode alike share a key: the likelier one keeps it
            entries.setdefault(self.token_text([t]), _finite(lp))
        return entries


def _finite(value: float | None) -> float | None:
    # JSON has no NaN or infinity (a degenerate temperature can produce them): such a logprob is null.
    return value if value is not None and math.isfinite(value) else None
