"""Tags, their states, and the reports release/resume return."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Tag = Literal["kv_cache", "weights", "cuda_graph"]
TAGS: tuple[Tag, ...] = ("kv_cache", "weights", "cuda_graph")
WeightsMode = Literal["cpu", "meta"]
PauseMode = Literal["wait", "abort"]


class TagState(enum.Enum):
    AWAKE = "awake"
    PAUSED = "paused"


def check_tags(tags: str | tuple[str, ...] | list[str] | None, allowed: tuple[str, ...] = TAGS) -> tuple[str, ...]:
    """Normalise a tag argument; unknown tags raise naming the allowed ones."""
    if tags is None:
        return allowed
    if isinstance(tags, str):
        tags = (tags,)
    tags = tuple(tags)
    if not tags:
        raise ValueError(f"tags is empty; name at least one of {allowed}, or pass None for all")
    unknown = [t for t in tags if t not in allowed]
    if unknown:
        raise ValueError(f"unknown memory tag(s) {unknown!r}; choose from {allowed}")
    return tuple(t for t in allowed if t in tags)  # canonical order, duplicates dropped


def check_release(tags: str | tuple[str, ...] | list[str] | None, weights_to: object, mode: object,
                  timeout_s: float) -> tuple[str, ...]:
    """The tags of a release, once its arguments are checked (ValueError saying how to fix each)."""
    if weights_to not in ("cpu", "meta"):
        raise ValueError(f"weights_to={weights_to!r} must be 'cpu' (pinned host copy) or 'meta' (discard)")
    if mode not in ("wait", "abort"):
        raise ValueError(f"mode={mode!r} must be 'wait' (drain in-flight requests) or 'abort'")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
    return check_tags(tags)


@dataclass
class TagReport:
    """What a release or resume did to one tag."""

    state_before: str
    state_after: str
    device_bytes: int = 0  # freed by a release, taken by a resume
    host_bytes: int = 0  # host copy written (release to cpu) or read (resume)
    seconds: float = 0.0
    message: str = ""


@dataclass
class MemoryReport:
    """The result of `release_memory` / `resume_memory` (JSON-safe through `to_dict`)."""

    action: Literal["release", "resume"]
    tags: dict[str, TagReport] = field(default_factory=dict)
    seconds: float = 0.0
    device_free_before: int = 0
    device_free_after: int = 0
    num_aborted: int = 0

    @property
    def device_bytes(self) -> int:
        return sum(t.device_bytes for t in self.tags.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_bytes"] = self.device_bytes
        return d

    def __str__(self) -> str:
        parts = [f"{tag}: {r.state_before}->{r.state_after} {r.device_bytes / 2**20:.1f} MiB"
                 f"{' (' + r.message + ')' if r.message else ''}" for tag, r in self.tags.items()]
        return f"{self.action} in {self.seconds * 1e3:.1f} ms; " + "; ".join(parts)
