"""The OpenAI response bodies of one request: its choices, whole (text_completion, chat.completion) or as chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from colocate.engine import SamplingParams
from colocate.engine.stream import StreamEvent
from colocate.model import Tokenizer
from colocate.server.openai_choices import Choice, Piece
from colocate.server.openai_schemas import ChatRequest, CompletionRequest


class CompletionJob:
    """A /v1/completions request as engine prompts, one Choice per (prompt, n), and its bodies.

    >>> job = CompletionJob(body, model="tiny", tokenizer=tok, max_model_len=4096)
    >>> engine.generate(job.prompts, job.params)   # then job.add(...) per output, job.final()
    Choices are in OpenAI's order: prompt-major, then the n samples of each prompt.
    """

    object_name, chunk_name = "text_completion", "text_completion"

    def __init__(self, body: CompletionRequest, *, model: str, tokenizer: Tokenizer | None, max_model_len: int,
                 extra_stop_ids: tuple[int, ...] | list[int] = ()) -> None:
        self.body, self.model, self.tokenizer = body, model, tokenizer
        self.id, self.created = f"{self._prefix()}-{uuid.uuid4().hex}", int(time.time())
        num_top = self._num_top()
        prompt_ids = [self._encode(p) for p in self._prompts()]
        self.num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self.choices: list[Choice] = []
        for ids in prompt_ids:  # one request per prompt; the engine returns its n choices in a row
            self.prompts.append(ids)
            self.params.append(body.params(
                max_new_tokens=self._max_new_tokens() or max_model_len, top_logprobs=num_top or 0,
                prompt_logprobs=self._prompt_logprobs(num_top), extra_stop_ids=list(extra_stop_ids)))
            for _ in range(body.n):
                self.choices.append(Choice(len(self.choices), tokenizer, stops=body.stop_strings(), num_top=num_top,
                                           echo_ids=ids if self._echoes() else None))
        self.has_stops = bool(body.stop_strings())

    # -- what differs between the two routes ------------------------------------------------
    def _prefix(self) -> str:
        return "cmpl"

    def _prompts(self) -> list[str] | list[list[int]]:
        return self.body.prompts()

    def _num_top(self) -> int | None:
        return self.body.logprobs

    def _max_new_tokens(self) -> int | None:
        return self.body.max_tokens

    def _echoes(self) -> bool:
        return self.body.echo

    def _prompt_logprobs(self, num_top: int | None) -> int | None:
        return num_top if self.body.echo and num_top is not None else None

    def choice_body(self, choice: Choice, piece: Piece, *, is_chunk: bool) -> dict[str, Any]:
        return {"index": choice.index, "text": (piece.prompt_text or "") + piece.text,
                "logprobs": choice.completion_logprobs(piece), "finish_reason": piece.finish_reason}

    # -- shared -----------------------------------------------------------------------------
    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise ValueError("the prompt is text but this model has no tokenizer.json; send token ids")
        return self.tokenizer.encode(prompt)

    @property
    def is_finished(self) -> bool:
        return all(choice.is_finished for choice in self.choices)

    def add(self, event: StreamEvent) -> Piece | None:
        choice = self.choices[event.index]
        return choice.add_delta(event.delta) if event.delta is not None else choice.add_output(event.output)

    def chunk(self, index: int, piece: Piece) -> dict[str, Any]:
        body = {"id": self.id, "object": self.chunk_name, "created": self.created, "model": self.model,
                "choices": [self.choice_body(self.choices[index], piece, is_chunk=True)]}
        if self.body.include_usage:
            body["usage"] = None  # OpenAI's shape: only the last chunk carries it
        return body

    def usage(self) -> dict[str, int]:
        num_completion = sum(choice.text.num_tokens for choice in self.choices)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": num_completion,
                "total_tokens": self.num_prompt_tokens + num_completion}

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_name, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def final(self, pieces: list[list[Piece]]) -> dict[str, Any]:
        """The whole response, from each choice's pieces (in order)."""
        choices = []
        for choice, parts in zip(self.choices, pieces):
            merged = Piece(text="".join(p.text for p in parts),
                           tokens=range(choice.text.num_tokens),
                           prompt_text=next((p.prompt_text for p in parts if p.prompt_text is not None), None),
                           finish_reason=choice.finish_reason)
            choices.append(self.choice_body(choice, merged, is_chunk=False))
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class ChatJob(CompletionJob):
    """A /v1/chat/completions request: the conversation rendered by the chat template, then as a completion."""

    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, body: ChatRequest, *, model: str, tokenizer: Tokenizer | None, max_model_len: int,
                 prompt_text: str, extra_stop_ids: tuple[int, ...] | list[int] = ()) -> None:
        self.prompt_text = prompt_text
        self.started: set[int] = set()  # choices whose first chunk (with the role) went out
        super().__init__(body, model=model, tokenizer=tokenizer, max_model_len=max_model_len,
                         extra_stop_ids=extra_stop_ids)

    def _prefix(self) -> str:
        return "chatcmpl"

    def _prompts(self) -> list[str]:
        return [self.prompt_text]

    def _num_top(self) -> int | None:
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    def _max_new_tokens(self) -> int | None:
        return self.body.max_new_tokens

    def _echoes(self) -> bool:
        return False

    def _prompt_logprobs(self, num_top: int | None) -> None:
        return None

    def choice_body(self, choice: Choice, piece: Piece, *, is_chunk: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"index": choice.index}
        if is_chunk:
            delta: dict[str, Any] = {}
            if choice.index not in self.started:
                self.started.add(choice.index)
                delta["role"] = "assistant"
            if piece.text or "role" in delta:
                delta["content"] = piece.text
            body["delta"] = delta
        else:
            body["message"] = {"role": "assistant", "content": piece.text}
        body["logprobs"] = choice.chat_logprobs(piece)
        body["finish_reason"] = piece.finish_reason
        return body
