"""What crosses the engine process's socket besides plain JSON: errors, reports, outputs and stream events."""

from __future__ import annotations

from typing import Any

from colocate.engine import GenerationOutput
from colocate.engine.core import EnginePausedError, PauseTimeoutError
from colocate.engine.memory_manager import ResumeOutOfMemoryError
from colocate.engine.sequence import TokenDelta
from colocate.engine.stream import StreamEvent
from colocate.memory.state import MemoryReport, TagReport
from colocate.weight_sync import UnknownLayoutError


class EngineProcessError(RuntimeError):
    """The engine's child process exited or stopped answering."""


class EngineInternalError(RuntimeError):
    """A bug in the engine process (not the caller's input, not the engine's state); its log has the traceback."""


# Errors the child may raise that the parent re-raises as the same type.
ERRORS: dict[str, type[Exception]] = {cls.__name__: cls for cls in (
    ValueError, RuntimeError, TimeoutError, EnginePausedError, PauseTimeoutError, ResumeOutOfMemoryError,
    UnknownLayoutError, EngineInternalError)}


def report_from_json(d: dict[str, Any]) -> MemoryReport:
    tags = {tag: TagReport(**r) for tag, r in d["tags"].items()}
    return MemoryReport(action=d["action"], tags=tags, seconds=d["seconds"], device_free_before=d["device_free_before"],
                        device_free_after=d["device_free_after"], num_aborted=d["num_aborted"])


def _pairs(lists: list[list] | None) -> list[list[tuple[int, float]]] | None:
    # JSON has no tuples: (token id, logprob) pairs arrive as two-element lists.
    return None if lists is None else [[(int(t), lp) for t, lp in row] for row in lists]


def output_from_json(d: dict[str, Any]) -> GenerationOutput:
    return GenerationOutput(**{**d, "top_logprobs": _pairs(d.get("top_logprobs")),
                               "prompt_top_logprobs": _pairs(d.get("prompt_top_logprobs"))})


def event_from_json(partial: dict[str, Any]) -> StreamEvent:
    delta = partial.get("delta")
    if delta is not None:
        delta = TokenDelta(**{**delta, "top_logprobs": _pairs(delta.get("top_logprobs")),
                              "prompt_top_logprobs": _pairs(delta.get("prompt_top_logprobs"))})
    output = partial.get("output")
    return StreamEvent(index=partial["index"], delta=delta, output=None if output is None else output_from_json(output))


def rebuild_error(error: dict[str, str]) -> Exception:
    cls = ERRORS.get(error.get("type", ""), RuntimeError)
    return cls(error.get("message", "the engine process reported an error"))
