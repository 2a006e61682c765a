"""SGLang's and vLLM's control routes, mapped onto colocate's verbs, for RL frameworks that already call them.

| route (engine) | body / query | colocate does | frameworks that send it |
| --- | --- | --- | --- |
| `POST /release_memory_occupation` (SGLang) | `{"tags": [...] or null}` | `release_memory(tags, weights_to="cpu", mode="wait")`; null: kv_cache and weights (graphs follow) | verl (`["kv_cache", "weights"]`), slime (`{}`) |
| `POST /resume_memory_occupation` (SGLang) | `{"tags": [...] or null}` | `resume_memory(tags)`; null: every tag | verl (`["weights"]`, then `["kv_cache"]`), slime (`["weights"]`, then `["kv_cache", "cuda_graph"]`) |
| `POST /pause_generation` (SGLang) | `{"mode": "abort"}` or `{}` | new requests wait (up to paused_wait_s); running ones finish with finish_reason "abort" | slime (`{}`) |
| `POST /continue_generation` (SGLang) | `{}` | requests are let in again | slime |
| `GET` or `POST /flush_cache` (SGLang) | none | 200 when no request runs or waits (colocate keeps no prefix cache), else 409: callers retry | verl, slime (both poll until 200) |
| `POST /update_weights_from_disk` (SGLang) | `{"model_path", "weight_version"?, "load_format"?, "abort_all_requests"?, "flush_cache"?}` | `update_weights_from_disk(model_path, version)`, only under `--weights-dir` (403 elsewhere) | slime |
| `GET /get_weight_version` (SGLang) | none | `{"weight_version": "N"}` (null before any update) | slime |
| `POST /update_weights_from_tensor` (SGLang) | pickled tensors | always 400: use `POST /update_weights` with `{"format": "ipc_bucket"}` (`colocate.weight_sync.BucketSender`) | verl, slime |
| `POST /sleep?level=1` or `?level=2` (vLLM) | `mode=abort` (default) or `wait` | `release_memory(("kv_cache", "weights"), weights_to="cpu" (level 1) or "meta" (level 2), mode)` | OpenRLHF (level 1), TRL (level 2) through vLLM's `sleep` |
| `POST /wake_up?tags=weights&tags=kv_cache` (vLLM) | tags repeatable; none: every tag | `resume_memory(tags)` | OpenRLHF, TRL (`weights`, then `kv_cache`) |
| `GET /is_sleeping` (vLLM) | none | `{"is_sleeping": true}` while any tag is paused | OpenRLHF |
| `POST /reset_prefix_cache` (vLLM) | none | nothing to reset: 200 | TRL, OpenRLHF after a weight update |

Not mirrored: vLLM's `POST /pause` and `/resume` (generation only) share their paths with colocate's
own `/pause` and `/resume` (memory), which keep colocate's meaning; SGLang's NCCL routes
(`/init_weights_update_group`, `/update_weights_from_distributed`) have no counterpart (404).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from colocate.memory.state import TAGS, TagState
from colocate.server.disk_roots import DiskRoots
from colocate.server.engine_client import AsyncEngine
from colocate.server.metrics import ServerMetrics
from colocate.server.routes import counted
from colocate.server.schemas import INT64_MAX, Tag

ROUTES = ("/release_memory_occupation", "/resume_memory_occupation", "/pause_generation", "/continue_generation",
          "/flush_cache", "/update_weights_from_disk", "/get_weight_version", "/update_weights_from_tensor",
          "/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache")
# SGLang's release without tags frees everything; here the decode graphs follow kv_cache and weights on
# their own (dropped with them, captured again once both are back), so a resume that names only those two
# also serves again, as SGLang's callers expect.
RELEASE_TAGS = ("kv_cache", "weights")
SLEEP_LEVELS = {1: "cpu", 2: "meta"}  # vLLM: level 1 keeps the weights in host memory, level 2 discards them


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MemoryOccupationRequest(_Body):
    """SGLang's ReleaseMemoryOccupationReqInput / ResumeMemoryOccupationReqInput."""

    tags: list[Tag] | None = None


class PauseGenerationRequest(_Body):
    """SGLang's PauseGenerationReqInput: only "abort" (running requests finish now) is implemented."""

    mode: Literal["abort"] = "abort"


class UpdateWeightsFromDiskRequest(_Body):
    """SGLang's UpdateWeightFromDiskReqInput, the fields that mean something here (and those that may be sent)."""

    model_path: str = Field(min_length=1)
    load_format: Literal["auto", "safetensors"] | None = None  # colocate reads safetensors folders
    weight_version: str | int | None = None  # SGLang's versions are strings; colocate's are integers
    abort_all_requests: bool = False
    flush_cache: bool = True  # nothing to flush: accepted, changes nothing
    is_async: bool = False  # accepted; the call returns once the update is done either way
    torch_empty_cache: bool = False  # accepted; the engine gives cached memory back on its own

    def version(self) -> int | None:
        v = self.weight_version
        if v is None or isinstance(v, int):
            return v if v is None or 0 <= v <= INT64_MAX else _bad_version(v)
        return int(v) if v.isdigit() and int(v) <= INT64_MAX else _bad_version(v)


def _bad_version(v: object) -> int:
    raise ValueError(f"weight_version={v!r}: colocate numbers weight versions with integers >= 0; send one "
                     "(as a number or a string of digits) or leave it out")


def add_compat_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics, *, disk_roots: DiskRoots) -> None:
    """Register the SGLang and vLLM routes of the table above on `app`."""

    def pause_counter(outcome: str) -> None:
        metrics.pauses.labels(outcome=outcome).inc()

    def resume_counter(outcome: str) -> None:
        metrics.resumes.labels(outcome=outcome).inc()

    async def release(tags: Any, weights_to: str, mode: str) -> dict[str, Any]:
        report = await counted(engine.control(engine.engine.release_memory, tags, weights_to=weights_to, mode=mode),
                               pause_counter, metrics.pause_seconds)
        return {"success": True, "message": str(report), "report": report.to_dict()}

    async def resume(tags: Any) -> dict[str, Any]:
        report = await counted(engine.control(engine.engine.resume_memory, tags), resume_counter,
                               metrics.resume_seconds)
        return {"success": True, "message": str(report), "report": report.to_dict()}

    # -- SGLang -------------------------------------------------------------------------------
    # SGLang answers GET and POST alike on these; one operation id each keeps the OpenAPI schema valid.
    @app.get("/release_memory_occupation", operation_id="release_memory_occupation_get")
    @app.post("/release_memory_occupation", operation_id="release_memory_occupation")
    async def release_memory_occupation(body: MemoryOccupationRequest | None = None) -> dict[str, Any]:
        """SGLang's release: colocate's /pause with weights kept in host memory, in-flight requests drained."""
        tags = body.tags if body is not None and body.tags else RELEASE_TAGS
        return await release(tags, "cpu", "wait")

    @app.get("/resume_memory_occupation", operation_id="resume_memory_occupation_get")
    @app.post("/resume_memory_occupation", operation_id="resume_memory_occupation")
    async def resume_memory_occupation(body: MemoryOccupationRequest | None = None) -> dict[str, Any]:
        """SGLang's resume: colocate's /resume (no tags: every tag)."""
        return await resume(body.tags if body is not None and body.tags else None)

    @app.post("/pause_generation")
    async def pause_generation(body: PauseGenerationRequest | None = None) -> dict[str, Any]:
        """SGLang's pause: new requests wait for /continue_generation; running ones finish now ("abort")."""
        num_aborted = engine.hold_generation(abort_running=True)
        return {"success": True, "message": f"generation paused; {num_aborted} running request(s) aborted",
                "num_aborted": num_aborted}

    @app.post("/continue_generation")
    async def continue_generation(body: Annotated[dict[str, Any] | None, Body()] = None) -> dict[str, Any]:
        """SGLang's continue: requests held since /pause_generation go on, new ones are taken."""
        was_held = engine.continue_generation()
        return {"success": True, "message": "generation continues" if was_held else "generation was not paused"}

    @app.get("/flush_cache", operation_id="flush_cache_get")
    @app.post("/flush_cache", operation_id="flush_cache")
    async def flush_cache() -> dict[str, Any]:
        """SGLang's flush: colocate keeps no prefix cache, so this only says whether the engine is idle (409 if not)."""
        status = await engine.memory_status()
        if status["num_running"] or status["num_waiting"]:
            raise RuntimeError(f"{status['num_running']} request(s) running and {status['num_waiting']} waiting; "
                               "retry once they finish (SGLang's /flush_cache refuses the same way)")
        return {"success": True, "message": "nothing cached to flush; the engine is idle"}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: UpdateWeightsFromDiskRequest) -> dict[str, Any]:
        """SGLang's disk update: colocate's {"format": "safetensors"} update, from folders under --weights-dir."""
        version = body.version()
        path = disk_roots.resolve(body.model_path)  # PermissionError (403) outside the roots, before any read
        was_held = engine.is_generation_held
        num_aborted = engine.hold_generation(abort_running=True) if body.abort_all_requests else 0
        try:
            result = await counted(
                engine.control(engine.engine.update_weights_from_disk, str(path), version=version),
                lambda outcome: metrics.weight_updates.labels(format="safetensors", outcome=outcome).inc(),
                metrics.weight_update_seconds.labels(format="safetensors"))
        finally:
            if body.abort_all_requests and not was_held:
                engine.continue_generation()
        return {"success": True, "message": f"loaded {path}", "num_paused_requests": num_aborted, **result}

    @app.get("/get_weight_version")
    async def get_weight_version() -> dict[str, Any]:
        """SGLang's version query: the last update's version as a string (null before any)."""
        version = (await engine.memory_status())["weights_version"]
        return {"weight_version": None if version is None else str(version)}

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor() -> dict[str, Any]:
        """Always refused: SGLang's form carries pickled tensors, which this server never unpickles."""
        raise ValueError("update_weights_from_tensor takes pickled tensors, which this server never unpickles. "
                         "Send the weights as CUDA IPC / shared-memory buckets described by JSON instead: "
                         "POST /update_weights with {\"format\": \"ipc_bucket\", \"message\": ...}, as "
                         "colocate.weight_sync.BucketSender (or colocate.client.Client.update_weights) sends them")

    # -- vLLM ---------------------------------------------------------------------------------
    @app.post("/sleep")
    async def sleep(level: Annotated[int, Query(description="1: weights to host memory; 2: weights discarded")] = 1,
                    mode: Annotated[Literal["abort", "wait"], Query(description="requests in flight")] = "abort",
                    ) -> dict[str, Any]:
        """vLLM's sleep: release every tag; level 1 keeps the weights in host memory, level 2 discards them."""
        if level not in SLEEP_LEVELS:
            raise ValueError(f"level={level}: colocate implements vLLM's sleep levels 1 (weights to host memory) "
                             "and 2 (weights discarded; send new ones before generating)")
        return await release(RELEASE_TAGS, SLEEP_LEVELS[level], mode)

    @app.post("/wake_up")
    async def wake_up(tags: Annotated[list[Tag] | None, Query(description="repeatable; none: every tag")] = None,
                      ) -> dict[str, Any]:
        """vLLM's wake up: resume `tags` (weights, kv_cache, cuda_graph), or every tag."""
        return await resume(tags or None)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        """vLLM's sleep state: true while any tag is paused."""
        state = (await engine.memory_status())["state"]
        return {"is_sleeping": any(state[tag] != TagState.AWAKE.value for tag in TAGS)}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, Any]:
        """vLLM's prefix cache reset: colocate keeps no prefix cache, so there is nothing to reset."""
        return {"success": True, "message": "nothing cached to reset"}
