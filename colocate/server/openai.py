"""The OpenAI-compatible routes: /v1/completions and /v1/models, with their request and response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from colocate.engine import GenerationOutput, SamplingParams
from colocate.model import Tokenizer
from colocate.server.cancel import cancel_on_disconnect
from colocate.server.engine_client import AsyncEngine
from colocate.server.metrics import ServerMetrics
from colocate.server.schemas import INT64_MAX, INT64_MIN, finite

ROUTES = ("/v1/completions", "/v1/models")


def add_openai_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics, *, model_name: str,
                      tokenizer: Tokenizer | None) -> None:
    """Register the OpenAI-compatible routes on `app`."""
    started = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        """The OpenAI completions subset: prompt, max_tokens, temperature, top_p, n, stop, logprobs, seed."""
        prompts, params = body.to_engine()
        outs = await cancel_on_disconnect(request, engine.generate(prompts, params))
        metrics.observe_outputs(outs)
        return completion_response(body, outs, model=model_name, tokenizer=tokenizer)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "colocate"}]}


class CompletionRequest(BaseModel):
    """POST /v1/completions. Fields outside this subset are accepted and ignored (clients send many),
    except `stream` and `echo`, which are refused rather than silently not honoured."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - 128)  # choice j samples with seed + j
    stream: bool = False
    echo: bool = False

    def to_engine(self) -> tuple[list[str] | list[list[int]], list[SamplingParams]]:
        """One engine prompt and SamplingParams per choice, in OpenAI's order (prompt-major, then n)."""
        if self.stream:
            raise ValueError("stream=true is not supported; send stream=false")
        if self.echo:
            raise ValueError("echo=true is not supported; send echo=false")
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompts, params = [], []
        for p in prompt:
            for j in range(self.n):
                prompts.append(p)
                params.append(SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                             top_p=self.top_p, seed=None if self.seed is None else self.seed + j,
                                             logprobs=True))
        return prompts, params

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would cut every completion to nothing


def completion_response(request: CompletionRequest, outs: list[GenerationOutput], *, model: str,
                        tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The OpenAI `text_completion` object for `outs` (in to_engine's order).

    Stop strings are applied after generation: the engine generates up to max_tokens, then
    each choice's text is cut before the first stop string it contains, the tokens wholly
    before the cut are kept, and finish_reason becomes "stop". `logprobs` gives the sampled
    token's log-probability only; `top_logprobs` lists that token alone (no alternatives).
    """
    stops = request.stop_strings()
    if stops and tokenizer is None:
        raise ValueError("stop strings need a tokenizer and this model has none; use token ids and no stop")
    choices = []
    num_completion_tokens = 0
    for index, out in enumerate(outs):
        ids, logprobs, reason = out.token_ids, out.logprobs or [], out.finish_reason
        text = out.text if out.text is not None else (tokenizer.decode(ids) if tokenizer is not None else "")
        needs_offsets = tokenizer is not None and (stops or request.logprobs is not None)
        # prefix[i]: characters of the text of the first i tokens.
        prefix = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)] if needs_offsets else []
        cuts = [i for s in stops if (i := text.find(s)) >= 0]
        if cuts:
            cut = min(cuts)
            keep = next((i for i in range(len(ids)) if prefix[i + 1] > cut), len(ids))
            text, ids, logprobs, reason = text[:cut], ids[:keep], logprobs[:keep], "stop"
        num_completion_tokens += len(ids)
        choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        if request.logprobs is not None:
            tokens = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else [str(t) for t in ids]
            lps = finite(logprobs)
            choice["logprobs"] = {
                "tokens": tokens, "token_logprobs": lps,
                "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, lps)] if request.logprobs > 0 else None,
                "text_offset": prefix[:len(ids)] if prefix else None}
        choices.append(choice)
    num_prompt_tokens = sum(len(out.prompt_token_ids) for out in outs[::request.n])
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
                      "total_tokens": num_prompt_tokens + num_completion_tokens}}
