"""Schemathesis fuzzes every operation of the server's OpenAPI schema against a real uvicorn: no 5xx, JSON errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from colocate import Engine, EngineConfig  # noqa: E402
from colocate.model import save_preset  # noqa: E402
from colocate.server.app import create_app  # noqa: E402
from colocate.server.serve import ServerThread  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Engine, Path]]:
    checkpoint = save_preset("tiny", tmp_path_factory.mktemp("tiny-fuzz"), seed=0)
    # A short max_model_len bounds the work of any fuzzed request (max_new_tokens is unbounded).
    engine = Engine(EngineConfig(model=str(checkpoint), device="cpu", max_model_len=48, paused_wait_s=0.5,
                                 kv_cache_bytes=64 << 20))
    with ServerThread(create_app(engine, api_key=KEY, max_body_bytes=1 << 20, weights_dirs=[str(checkpoint)])) as server:
        yield server, engine, checkpoint
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: tuple[ServerThread, Engine, Path]) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server[0].url}/openapi.json")


def errors_are_json(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every refusal carries {"error": {"type", "message"}}; a 503 also says when to retry."""
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["type"] and body["error"]["message"], body
    if response.status_code == 503:
        assert response.headers.get("retry-after"), response.headers


# Driven through hypothesis directly rather than schemathesis' pytest plugin, whose fixture
# integration breaks on newer pytest ('Function' object has no attribute '_nodeid').
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors(mode: schemathesis.GenerationMode, api_schema: schemathesis.BaseSchema,
                          fuzz_server: tuple[ServerThread, Engine, Path]) -> None:
    server, engine, checkpoint = fuzz_server
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    calls: list[str] = []

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            calls.append(operation.label)
            try:
                case.call_and_validate(headers=AUTH, checks=[not_a_server_error, errors_are_json], timeout=60)
            finally:
                engine.resume_memory()
                if engine.memory_status()["num_missing_weights"]:
                    engine.update_weights_from_disk(str(checkpoint))
                if operation.label == "POST /pause_generation":  # the next operations must not be held
                    httpx.post(f"{server.url}/continue_generation", headers=AUTH)

        try:
            fuzz()
        except Unsatisfiable:
            # Negative mode has nothing to make invalid in an operation without inputs (GET /health) or
            # whose inputs take any string (GET /v1/models/{model_id}).
            assert mode == schemathesis.GenerationMode.NEGATIVE and not _can_be_invalid(operation), operation.label
    exercised = set(calls)
    expected = {op.label for op in operations if mode == schemathesis.GenerationMode.POSITIVE or _can_be_invalid(op)}
    assert exercised >= expected, expected - exercised  # every operation with inputs was exercised


def _can_be_invalid(operation: object) -> bool:
    """Whether the operation takes a body, or a parameter that not every string satisfies."""
    definition = operation.definition.raw
    return bool(definition.get("requestBody")) or any(
        p.get("schema", {}) != {"type": "string", "title": p.get("schema", {}).get("title")}
        for p in definition.get("parameters", []))
