"""The FastAPI app: colocate's routes, the OpenAI-compatible ones and the SGLang/vLLM ones, behind one guard."""

from __future__ import annotations

from fastapi import FastAPI

from colocate.engine import Engine
from colocate.model import Tokenizer, resolve_chat_template, resolve_config
from colocate.process import EngineProcess
from colocate.server import compat, errors, openai, routes
from colocate.server.chat_template import ChatTemplate
from colocate.server.disk_roots import DiskRoots
from colocate.server.engine_client import AsyncEngine
from colocate.server.guard import Guard
from colocate.server.metrics import ServerMetrics

__all__ = ["create_app"]
# Paths that report state and change nothing: open even when an API key is set.
OPEN_PATHS = frozenset({"/health", "/memory", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})


def create_app(engine: Engine | EngineProcess, *, api_key: str | None = None, max_body_bytes: int = 64 << 20,
               served_model_names: list[str] | tuple[str, ...] = (),
               weights_dirs: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """An HTTP front for `engine` (in this process or its child, from `launch_engine`).

    >>> app = create_app(Engine(EngineConfig(model="tiny")), api_key="secret")
    >>> uvicorn.run(app, host="127.0.0.1", port=30000)      # or `colocate serve`
    With `api_key`, every route but /health, /memory, /metrics and the OpenAPI docs needs the
    header `Authorization: Bearer <api_key>` (401 otherwise). Bodies over `max_body_bytes` get
    413. The OpenAI routes answer to `served_model_names` (none: the model's path or preset
    name). Disk weight updates read only folders under `weights_dirs` (none: refused). Every
    error is JSON: {"error": {"code": ..., "type": ..., "message": ...}}, with a stable `code`.
    """
    metrics = ServerMetrics(engine.memory_status)
    tokenizer: Tokenizer | None = (engine.tokenizer if hasattr(engine, "tokenizer")
                                   else resolve_config(engine.config.model)[1])
    source = resolve_chat_template(engine.config.model)
    models = openai.ServedModels(list(served_model_names) or [engine.config.model])
    disk_roots = DiskRoots(weights_dirs)
    async_engine = AsyncEngine(engine)
    app = FastAPI(title="colocate", version="0.1.0", description=create_app.__doc__,
                  on_shutdown=[async_engine.close])
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics,
                       routes=frozenset(routes.ROUTES + openai.ROUTES + compat.ROUTES), open_paths=OPEN_PATHS)
    errors.install(app, bad_request_paths=frozenset(openai.ROUTES))
    routes.add_routes(app, async_engine, metrics, model_name=models.names[0], disk_roots=disk_roots)
    openai.add_openai_routes(app, async_engine, metrics, models=models, tokenizer=tokenizer,
                             chat_template=None if source is None else ChatTemplate(source))
    compat.add_compat_routes(app, async_engine, metrics, disk_roots=disk_roots)
    return app
