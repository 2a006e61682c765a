"""Request and response bodies of the HTTP server, and their conversion to and from engine calls."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from colocate.engine import GenerationOutput, SamplingParams

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
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
    top_k: int = Field(_DEFAULT.top_k, le=INT64_MAX)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = _DEFAULT.ignore_eos
    logprobs: bool = _DEFAULT.logprobs
    top_logprobs: int = _DEFAULT.top_logprobs  # k most likely tokens per output token (output's top_logprobs)
    prompt_logprobs: int | None = _DEFAULT.prompt_logprobs  # k: score the prompt's tokens too, k alternatives each
    presence_penalty: float = _DEFAULT.presence_penalty
    frequency_penalty: float = _DEFAULT.frequency_penalty
    n: int = _DEFAULT.n  # responses per prompt (prompt-major in the answer, which is then a list)

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
    top_logprobs: list[list[tuple[int, float | None]]] | None = None  # per output token, [id, logprob] pairs
    prompt_logprobs: list[float | None] | None = None  # per prompt token (null first) when asked for
    prompt_top_logprobs: list[list[tuple[int, float | None]]] | None = None

    @classmethod
    def from_output(cls, out: GenerationOutput) -> GenerateOutput:
        return cls(output_ids=out.token_ids, text=out.text, logprobs=finite(out.logprobs),
                   finish_reason=out.finish_reason, top_logprobs=_finite_pairs(out.top_logprobs),
                   prompt_logprobs=finite(out.prompt_logprobs), prompt_top_logprobs=_finite_pairs(out.prompt_top_logprobs))


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
    version: int | None = Field(None, ge=0, le=INT64_MAX)
    partial: bool = False  # true: weights the manifest leaves out keep their values (the answer lists them)


class IpcBucketUpdate(_Strict):
    """One bucket message of a double-buffered update (what `colocate.weight_sync.BucketSender` sends)."""

    format: Literal["ipc_bucket"]
    message: dict[str, Any]  # parsed by BucketImporter with the strict JSON checks; never unpickled


class SafetensorsUpdate(_Strict):
    """A safetensors checkpoint folder readable by the server."""

    format: Literal["safetensors"]
    path: str = Field(min_length=1)
    version: int | None = Field(None, ge=0, le=INT64_MAX)
    partial: bool = False  # true: weights the checkpoint lacks keep their values (the answer lists them)


UpdateWeightsRequest = Annotated[IpcUpdate | IpcBucketUpdate | SafetensorsUpdate, Field(discriminator="format")]


def finite(values: list[float | None] | None) -> list[float | None] | None:
    # JSON has no NaN or infinity (a degenerate temperature can produce them): such a logprob is null.
    return None if values is None else [v if v is not None and math.isfinite(v) else None for v in values]


def _finite_pairs(rows: list[list[tuple[int, float]]] | None) -> list[list[tuple[int, float | None]]] | None:
    return None if rows is None else [[(t, finite([lp])[0]) for t, lp in row] for row in rows]
