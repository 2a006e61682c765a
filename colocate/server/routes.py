"""colocate's own routes: generate, pause, resume, update weights; health, memory and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Body, FastAPI, Request
from fastapi.responses import Response

from colocate.server.cancel import cancel_on_disconnect
from colocate.server.engine_client import AsyncEngine
from colocate.server.metrics import CONTENT_TYPE, ServerMetrics
from colocate.server.schemas import (GenerateOutput, GenerateRequest, IpcBucketUpdate, IpcUpdate, PauseRequest,
                                     ResumeRequest, SafetensorsUpdate, UpdateWeightsRequest)
from colocate.weight_sync import device_uuid

T = TypeVar("T")
ROUTES = ("/generate", "/pause", "/resume", "/update_weights", "/update_weights/abort", "/health", "/memory",
          "/metrics")


def add_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics, *, model_name: str,
               disk_roots: Any) -> None:
    """Register colocate's native routes on `app`. `disk_roots` decides which folders disk updates may read."""

    @app.post("/generate", response_model=GenerateOutput | list[GenerateOutput])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Generate for one prompt (answers an object) or a list (answers a list; with `n` > 1, n outputs per
        prompt, prompt-major). Concurrent requests join one batch. While the engine is paused this waits for
        /resume, up to paused_wait_s, then 503. A client that disconnects has its requests aborted within one
        step."""
        prompts, is_batched = body.prompts()
        params = body.sampling_params.to_params()
        outs = await cancel_on_disconnect(request, engine.generate(prompts, params))
        metrics.observe_outputs(outs, n=params.n)
        results = [GenerateOutput.from_output(out) for out in outs]
        return results if is_batched or params.n > 1 else results[0]

    @app.post("/pause")
    async def pause(body: PauseRequest | None = None) -> dict[str, Any]:
        """engine.release_memory: free the device memory of `tags` (default all); returns its report."""
        body = body or PauseRequest()
        report = await counted(engine.control(engine.engine.release_memory, body.tags, weights_to=body.weights_to,
                                              mode=body.mode, timeout_s=body.timeout_s),
                               lambda outcome: metrics.pauses.labels(outcome=outcome).inc(), metrics.pause_seconds)
        return report.to_dict()

    @app.post("/resume")
    async def resume(body: ResumeRequest | None = None) -> dict[str, Any]:
        """engine.resume_memory: take device memory back for `tags` (default all); returns its report."""
        body = body or ResumeRequest()
        report = await counted(engine.control(engine.engine.resume_memory, body.tags),
                               lambda outcome: metrics.resumes.labels(outcome=outcome).inc(), metrics.resume_seconds)
        return report.to_dict()

    @app.post("/update_weights")
    async def update_weights(body: UpdateWeightsRequest = Body(...)) -> dict[str, Any]:
        """Copy new weights in place: {"format": "ipc", "manifest": {...}} (every bucket exported by a process
        on this host, in one request), {"format": "ipc_bucket", "message": {...}} (one bucket of a
        double-buffered update, as `colocate.weight_sync.BucketSender` sends them), or
        {"format": "safetensors", "path": ...} (a folder under a root the operator allowed with
        --weights-dir). Everything is validated before the first copy: a refused update changes nothing."""
        if isinstance(body, IpcUpdate):
            call = engine.control(engine.json_side.update_weights_from_manifest,
                                  _with_version(body.manifest, body.version), partial=body.partial)
        elif isinstance(body, IpcBucketUpdate):
            call = engine.control(engine.json_side.import_bucket, body.message)
        else:
            assert isinstance(body, SafetensorsUpdate), f"{type(body)=}"
            path = disk_roots.resolve(body.path)  # PermissionError (403) outside the roots, before any read
            call = engine.control(engine.engine.update_weights_from_disk, str(path), version=body.version,
                                  partial=body.partial)
        return await counted(call, lambda outcome: metrics.weight_updates.labels(format=body.format,
                                                                                 outcome=outcome).inc(),
                             metrics.weight_update_seconds.labels(format=body.format))

    @app.post("/update_weights/abort")
    async def abort_update() -> dict[str, Any]:
        """Close a bucketed update that is open; the engine refuses to generate until a complete one arrives."""
        await engine.control(engine.json_side.abort_weight_update)
        return {"aborted": True}

    uuid = device_uuid(engine.config.torch_device)  # where a producer must put its IPC buckets

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """State per tag, whether every tag is awake, and the weights' version. Never waits behind generation."""
        status = await engine.memory_status()
        return {"status": "ok", "model": model_name, "state": status["state"], "is_awake": status["is_awake"],
                "weights_version": status["weights_version"], "dtype": engine.config.dtype, "device_uuid": uuid}

    @app.get("/memory")
    async def memory() -> dict[str, Any]:
        """engine.memory_status(): bytes per tag on device and host, states, the device's free and total."""
        return await engine.memory_status()

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text; the engine's gauges are read at each scrape."""
        text = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return Response(text, media_type=CONTENT_TYPE)


async def counted(call: Awaitable[T], count: Callable[[str], None], histogram: Any) -> T:
    """Await a control call, counting it by outcome ("ok" or the error's type) and timing it when it succeeds."""
    start = time.perf_counter()
    try:
        result = await call
    except Exception as e:
        count(type(e).__name__)
        raise
    count("ok")
    histogram.observe(time.perf_counter() - start)
    return result


def _with_version(manifest: dict[str, Any], version: int | None) -> dict[str, Any]:
    """The manifest with the body's version where it names none; two different versions are refused."""
    if version is None:
        return manifest
    if manifest.get("version") is None:
        return {**manifest, "version": version}
    if manifest["version"] != version:
        raise ValueError(f"the body says version={version} but the manifest says {manifest['version']!r}; "
                         "send one, or the same in both")
    return manifest
