"""The OpenAI-compatible routes: completions and chat completions (whole or streamed as server-sent events), models."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from colocate.model import Tokenizer
from colocate.server.cancel import cancel_on_disconnect
from colocate.server.chat_template import ChatTemplate
from colocate.server.engine_client import AsyncEngine, EngineStream
from colocate.server.errors import ModelNotFoundError, error_body
from colocate.server.metrics import ServerMetrics
from colocate.server.openai_choices import Piece
from colocate.server.openai_responses import ChatJob, CompletionJob
from colocate.server.openai_schemas import ChatRequest, CompletionRequest

log = logging.getLogger("colocate.server")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class ServedModels:
    """The names this server answers to (`colocate serve --served-model-name`, repeatable); the first is the default.

    >>> ServedModels(["qwen", "policy"]).resolve("policy")   # "policy"
    >>> ServedModels(["qwen"]).resolve("gpt-4o")             # ModelNotFoundError: 404 model_not_found
    """

    def __init__(self, names: list[str]) -> None:
        if not names or not all(names):
            raise ValueError("give at least one non-empty served model name")
        self.names, self.created = list(dict.fromkeys(names)), int(time.time())

    def resolve(self, name: str | None) -> str:
        if name is None:
            return self.names[0]
        if name not in self.names:
            raise ModelNotFoundError(f"the model {name!r} does not exist on this server; it serves "
                                     f"{', '.join(repr(n) for n in self.names)} (GET /v1/models)")
        return name

    def card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "colocate"}


def add_openai_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics, *, models: ServedModels,
                      tokenizer: Tokenizer | None, chat_template: ChatTemplate | None) -> None:
    """Register the OpenAI-compatible routes on `app`."""
    # The template's end-of-turn token, when it is one token, also ends a chat reply (Llama 3's
    # <|eot_id|>, for one, is not the eos_token_id of its config.json).
    chat_stop_ids: list[int] = []
    if chat_template is not None and chat_template.eos_token and tokenizer is not None:
        ids = tokenizer.encode(chat_template.eos_token)
        chat_stop_ids = ids if len(ids) == 1 else []

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI completions: prompt (text, ids, or a list of either), max_tokens, temperature, top_p, n, stop,
        seed, logprobs (k alternatives per token), echo, presence and frequency penalties, stream with
        stream_options.include_usage; also top_k, ignore_eos and stop_token_ids. Anything else is a 400."""
        job = CompletionJob(body, model=models.resolve(body.model), tokenizer=tokenizer,
                            max_model_len=engine.config.max_model_len)
        return await respond(request, engine, metrics, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """OpenAI chat completions through the checkpoint's chat template (tokenizer_config.json): messages,
        max_tokens / max_completion_tokens, temperature, top_p, n, stop, seed, logprobs with top_logprobs,
        presence and frequency penalties, stream with stream_options.include_usage. Text content only."""
        model = models.resolve(body.model)
        if chat_template is None:
            raise ValueError("this model has no chat template (no chat_template in its tokenizer_config.json, "
                             "no chat_template.jinja); use /v1/completions with a prompt you format yourself")
        prompt = chat_template.render([m.for_template() for m in body.messages],
                                      add_generation_prompt=body.add_generation_prompt,
                                      extra=body.chat_template_kwargs)
        job = ChatJob(body, model=model, tokenizer=tokenizer, max_model_len=engine.config.max_model_len,
                      prompt_text=prompt, extra_stop_ids=chat_stop_ids)
        return await respond(request, engine, metrics, job)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The served model names (the first is used when a request names none)."""
        return {"object": "list", "data": [models.card(name) for name in models.names]}

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """One served model; 404 model_not_found for any other name."""
        return models.card(models.resolve(model_id))


async def respond(request: Request, engine: AsyncEngine, metrics: ServerMetrics, job: CompletionJob) -> Any:
    """Run `job` and answer it: whole, or as server-sent events when it asks to stream.

    Without stop strings a whole answer takes the engine's outputs at once. With them the request
    streams inside the server, so each choice stops at its stop string instead of running to max_tokens.
    """
    if not job.body.stream and not job.has_stops:
        outs = await cancel_on_disconnect(request, engine.generate(job.prompts, job.params))
        metrics.observe_outputs(outs, n=job.body.n)
        pieces = [[piece] if (piece := choice.add_output(out)) else [] for choice, out in zip(job.choices, outs)]
        return job.final(pieces)
    stream = await engine.stream(job.prompts, job.params)
    if not job.body.stream:
        pieces = await cancel_on_disconnect(request, _collect(stream, job, metrics))
        return job.final(pieces)
    # The first event (or the request's error) before any byte: an early refusal stays an HTTP error.
    try:
        first = await cancel_on_disconnect(request, stream.__anext__())
    except StopAsyncIteration:
        first = None
    except BaseException:
        stream.close()
        raise
    return StreamingResponse(_events(stream, first, job, metrics), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _collect(stream: EngineStream, job: CompletionJob, metrics: ServerMetrics) -> list[list[Piece]]:
    pieces: list[list[Piece]] = [[] for _ in job.choices]
    try:
        async for event in stream:
            if event.output is not None:
                metrics.observe_outputs([event.output], n=job.body.n, first_index=event.index)
            piece = job.add(event)
            if piece is not None:
                pieces[event.index].append(piece)
            if job.is_finished:
                break  # every choice hit a stop string or finished: the rest is aborted
    finally:
        stream.close()
    return pieces


async def _events(stream: EngineStream, first: Any, job: CompletionJob, metrics: ServerMetrics,
                  ) -> AsyncIterator[str]:
    """`data: {chunk}` per piece, the usage chunk if asked, `data: [DONE]`. A client that goes away
    cancels this generator, and closing the stream aborts the engine's requests."""
    try:
        event = first
        while event is not None:
            if event.output is not None:
                metrics.observe_outputs([event.output], n=job.body.n, first_index=event.index)
            piece = job.add(event)
            if piece is not None:
                yield _sse(job.chunk(event.index, piece))
            if job.is_finished:
                break
            event = await anext(stream, None)
        if job.body.include_usage:
            yield _sse(job.usage_chunk())
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error travels as an event
        log.warning("a streamed request failed after its first chunk: %s", e)
        yield _sse(error_body(e))
    finally:
        stream.close()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
