"""The OpenAI request bodies: strict types, the fields this server honours, and a 400 naming any other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from colocate.engine import SamplingParams
from colocate.server.schemas import INT64_MAX, INT64_MIN

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat's top_logprobs; completions' logprobs shares it here
# Fields clients send that change nothing here when they hold these values; any other value is refused.
_HARMLESS: dict[str, Callable[[Any], bool]] = {
    "logit_bias": lambda v: not v, "suffix": lambda v: not v, "tools": lambda v: not v,
    "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: v is None or v == {"type": "text"}, "store": lambda v: not v,
    "metadata": lambda v: True, "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]), "audio": lambda v: v is None, "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None, "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None, "user": lambda v: True, "safety_identifier": lambda v: True,
    "prompt_cache_key": lambda v: True, "min_tokens": lambda v: v in (None, 0),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # true: a last chunk, with no choices, carries the usage


class _OpenAIRequest(BaseModel):
    """Fields both routes share. Types are strict ("5" is not 5); a field outside this subset is a 400
    naming it, unless it holds a value that asks for nothing (`logit_bias: {}`, `tools: []`, ...)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None  # a name from GET /v1/models (404 model_not_found otherwise); None: the first
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - 128)  # choice j samples with seed + j
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # Beyond OpenAI, under vLLM's names: the engine's own sampling controls.
    top_k: int = Field(0, ge=-1, le=INT64_MAX)  # 0 or -1: off
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self) -> _OpenAIRequest:
        for name, value in (self.model_extra or {}).items():
            if name == "best_of" and value in (None, self.n):
                continue
            if name in _HARMLESS and _HARMLESS[name](value):
                continue
            if name in _HARMLESS or name == "best_of":
                raise ValueError(f"{name}={value!r} is not supported by this server; leave it out")
            raise ValueError(f"unknown field {name!r}; see GET /docs for the fields this server takes")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would cut every completion to nothing

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def params(self, *, max_new_tokens: int, top_logprobs: int, prompt_logprobs: int | None,
               extra_stop_ids: tuple[int, ...] | list[int] = ()) -> SamplingParams:
        """The engine's SamplingParams for a prompt's `n` choices (they share its prefill; choice j samples
        with seed + j)."""
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, n=self.n,
                              stop_token_ids=[*(self.stop_token_ids or []), *extra_stop_ids],
                              ignore_eos=self.ignore_eos, logprobs=True, top_logprobs=top_logprobs,
                              prompt_logprobs=prompt_logprobs, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty)


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # None: up to the context length
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # k: the sampled token's and k alternatives
    echo: bool = False  # the prompt before the completion (and its tokens' logprobs, with logprobs)

    def prompts(self) -> list[str] | list[list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ValueError("prompt is empty; give a string, a list of token ids, or a list of either")
        return list(prompt)


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]  # images and audio are not supported: any other type is a 400 naming it
    text: str


class ChatMessage(BaseModel):
    """One message; fields beyond role and content (name, tool_calls, ...) reach the template as sent."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None

    def for_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # text parts, joined as one string: what most templates expect
            content = "\n".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content}


class ChatRequest(_OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context length
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; wins if both
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs: true
    # Beyond OpenAI, under vLLM's names: template controls.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template (enable_thinking, ...)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
