"""An Engine's methods as JSON-in, JSON-out calls: what the engine process serves and the HTTP server calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from colocate.engine import Engine, EngineConfig, SamplingParams
from colocate.engine.sequence import Sequence
from colocate.engine.stream import submit_streaming
from colocate.weight_sync import BucketImporter, device_uuid

# Which of a service's methods run where: status answers at once on the reader, control calls run in
# arrival order on one thread of their own (a weight update's buckets must), generate never takes a thread.
STATUS_METHODS = frozenset({"memory_status", "info"})
CONTROL_METHODS = frozenset({"release_memory", "resume_memory", "release_host_arena", "import_bucket",
                             "abort_weight_update", "update_weights_from_manifest", "update_weights_from_disk"})


class EngineService:
    """Turns JSON-safe arguments into Engine calls and answers JSON-safe results.

    >>> service = EngineService(engine)
    >>> service.release_memory(tags=None, weights_to="meta", mode="abort", timeout_s=5)   # a report dict
    >>> service.import_bucket(message)             # one BucketSender message (see colocate.weight_sync)
    >>> service.submit(prompts, params, single_params=False, done=reply)                 # answers later
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.importer = BucketImporter(engine, device=engine.config.torch_device)

    def info(self) -> dict[str, Any]:
        return {"device_uuid": device_uuid(self.engine.config.torch_device),
                "model_type": self.engine.model_config.model_type, "vocab_size": self.engine.model_config.vocab_size,
                "dtype": self.engine.config.dtype, "device": self.engine.config.device, **self.engine.limits()}

    def submit(self, prompts: Any, params: list[dict], single_params: bool,
               done: Callable[[list[dict] | None, BaseException | None], None],
               partial: Callable[[dict], None] | None = None) -> list[Sequence]:
        """Queue a generate request; `done(outputs, error)` is called once when its last sequence finishes.

        With `partial`, the request streams: `partial({"index": i, "delta": {...}})` for each step that
        added tokens to prompt i, and `partial({"index": i, "output": {...}})` once it finished, all
        before `done`.
        """
        plist = [SamplingParams(**p) for p in params]

        def finished(i: int, seq: Sequence) -> None:
            partial({"index": i, "output": dataclasses.asdict(self.engine.output(seq))})

        def all_finished(seqs: list[Sequence]) -> None:
            error = next((s.error for s in seqs if s.error is not None), None)
            done(None if error else [dataclasses.asdict(self.engine.output(s)) for s in seqs], error)

        return submit_streaming(
            self.engine, prompts, plist[0] if single_params else plist, on_done=all_finished,
            on_delta=None if partial is None else lambda i, d: partial({"index": i, "delta": dataclasses.asdict(d)}),
            on_finish=None if partial is None else finished)

    def release_memory(self, **kwargs: Any) -> dict:
        return self.engine.release_memory(**kwargs).to_dict()

    def resume_memory(self, tags: list[str] | None) -> dict:
        return self.engine.resume_memory(tags).to_dict()

    def memory_status(self) -> dict:
        return self.engine.memory_status()

    def release_host_arena(self) -> int:
        return self.engine.release_host_arena()

    def import_bucket(self, message: dict) -> dict:
        """One message of a BucketSender's update: the bucket it names is copied in place."""
        return self.importer.load(message)

    def abort_weight_update(self) -> None:
        self.importer.abort()

    def update_weights_from_manifest(self, manifest: dict, partial: bool = False) -> dict:
        return self.importer.apply_manifest(manifest, partial=partial)

    def update_weights_from_disk(self, path: str, version: int | None, partial: bool = False) -> dict:
        return self.engine.update_weights_from_disk(path, version=version, partial=partial)


def config_from_json(config: dict) -> EngineConfig:
    """The EngineConfig a parent sent as JSON (only its known fields; anything else is a ValueError)."""
    if type(config) is not dict:
        raise ValueError("the engine config must be a JSON object")
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown EngineConfig field(s) {unknown}")
    return EngineConfig(**config)
