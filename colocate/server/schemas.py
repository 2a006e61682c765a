"""Request and response bodies of the HTTP server, and their conversion to and from engine calls."""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from colocate.engine import GenerationOutput, SamplingParams
from colocate.model import Tokenizer

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_DEFAULT = SamplingParams()  # one source of truth for the defaults shown in the OpenAPI schema
Tag = Literal["kv_cache", "weights", "cuda_graph"]


class _Strict(BaseModel):
    # Our own endpoints: no unknown keys (a typo must not be ignored), no "1" for 1, no NaN.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# -- /generate ----------------------------------------------------------------------------
class SamplingParamsBody(_Strict):
    """The `SamplingParams` fields; their ranges are checked by `SamplingParams` itself (a 400 that says why)."""

    max_new_tokens: int = _DEFAULT.max_new_tokens
    temperature: float = _DEFAULT.temperature
    top_p: float = _DEFAULT.top_p
    # Bounded here only because the engine packs them into int64 tensors.
    top_k: int = Field(_DEFAULT.top_k, le=_INT64_MAX)
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = _DEFAULT.ignore_eos
    logprobs: bool = _DEFAULT.logprobs

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class GenerateRequest(_Strict):
    """`text` (one string or a list) or `input_ids` (one list of ids or a list of them), not both."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)

    def prompts(self) -> tuple[str | list[str] | list[int] | list[list[int]], bool]:
        """(what Engine.generate takes, whether the request was batched: a list answers a list)."""
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' (a string or a list of strings) or 'input_ids' "
                             "(a list of token ids or a list of such lists)")
        if self.text is not None:
            return self.text, isinstance(self.text, list)
        ids = self.input_ids
        return ids, bool(ids) and isinstance(ids[0], list)


class GenerateOutput(BaseModel):
    output_ids: list[int]
    text: str | None  # None when the model has no tokenizer
    logprobs: list[float | None] | None  # per output token; None when not asked for
    finish_reason: str  # "stop" (EOS or a stop token), "length", or "abort" (a pause with mode="abort")

    @classmethod
    def from_output(cls, out: GenerationOutput) -> GenerateOutput:
        return cls(output_ids=out.token_ids, text=out.text, logprobs=_finite(out.logprobs),
                   finish_reason=out.finish_reason)


# -- /pause, /resume, /update_weights ------------------------------------------------------
class PauseRequest(_Strict):
    tags: list[Tag] | Tag | None = None  # None: every tag
    weights_to: Literal["cpu", "meta"] = "cpu"
    mode: Literal["wait", "abort"] = "wait"
    timeout_s: float = 60.0


class ResumeRequest(_Strict):
    tags: list[Tag] | Tag | None = None


class IpcUpdate(_Strict):
    """A complete weight-sync manifest (JSON) whose buckets a process on this host exported."""

    format: Literal["ipc"]
    manifest: dict[str, Any]  # parsed by WeightManifest.from_dict, the strict validator; never unpickled
    version: int | None = Field(None, ge=0, le=_INT64_MAX)


class IpcBucketUpdate(_Strict):
    """One bucket message of a double-buffered update (what `colocate.weight_sync.BucketSender` sends)."""

    format: Literal["ipc_bucket"]
    message: dict[str, Any]  # parsed by BucketImporter with the strict JSON checks; never unpickled


class SafetensorsUpdate(_Strict):
    """A safetensors checkpoint folder readable by the server."""

    format: Literal["safetensors"]
    path: str = Field(min_length=1)
    version: int | None = Field(None, ge=0, le=_INT64_MAX)


UpdateWeightsRequest = Annotated[IpcUpdate | IpcBucketUpdate | SafetensorsUpdate, Field(discriminator="format")]


# -- the OpenAI-compatible subset ----------------------------------------------------------
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
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX - 128)  # choice j samples with seed + j
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
            lps = _finite(logprobs)
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


def _finite(values: list[float] | None) -> list[float | None] | None:
    # JSON has no NaN or infinity (a degenerate temperature can produce them): such a logprob is null.
    return None if values is None else [v if math.isfinite(v) else None for v in values]
