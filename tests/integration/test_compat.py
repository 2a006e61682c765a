"""SGLang's and vLLM's control routes, each called with the body (or query) the RL framework that uses it sends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from colocate import Engine, EngineConfig, SamplingParams  # noqa: E402
from colocate.server.app import create_app  # noqa: E402
from colocate.server.serve import ServerThread  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
PROMPTS = ["Hello world", "colocate"]


@pytest.fixture(scope="module")
def engine(checkpoints: tuple[Path, Path]) -> Iterator[Engine]:
    engine = Engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=512, paused_wait_s=30))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine: Engine, checkpoints: tuple[Path, Path]) -> Iterator[ServerThread]:
    with ServerThread(create_app(engine, weights_dirs=[str(checkpoints[1])])) as server:
        yield server


@pytest.fixture
def http(server: ServerThread, engine: Engine, checkpoints: tuple[Path, Path]) -> Iterator[httpx.Client]:
    version = engine.weights_version
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
        client.post("/continue_generation", json={})
    # Whatever a test did, the next starts awake, taking requests, on checkpoint A.
    engine.resume_memory()
    if engine.weights_version != version or engine.memory_status()["num_missing_weights"]:
        engine.update_weights_from_disk(str(checkpoints[0]))


@pytest.fixture(scope="module")
def expected(engine: Engine, checkpoints: tuple[Path, Path]) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of PROMPTS on checkpoint A (the served one) and on checkpoint B."""
    with Engine(EngineConfig(model=str(checkpoints[1]), device="cpu", max_model_len=64)) as other:
        b = [o.token_ids for o in other.generate(PROMPTS, GREEDY)]
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)], b


def tokens(http: httpx.Client) -> list[list[int]]:
    r = http.post("/generate", json={"text": PROMPTS, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert r.status_code == 200, r.text
    return [out["output_ids"] for out in r.json()]


def states(http: httpx.Client) -> dict[str, str]:
    return http.get("/memory").json()["state"]


def test_verl_release_then_staged_resume(http: httpx.Client, expected: tuple) -> None:
    # verl's SGLang adapter: release {"tags": ["kv_cache", "weights"]}; resume weights, then kv_cache; GET /flush_cache.
    r = http.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights"]})
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert set(states(http).values()) == {"paused"}  # the decode graphs went with what they point at
    assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    assert states(http) == {"kv_cache": "paused", "weights": "awake", "cuda_graph": "paused"}
    assert http.post("/resume_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
    assert set(states(http).values()) == {"awake"}  # graphs come back with kv_cache: the engine serves again
    assert http.get("/flush_cache").status_code == 200
    assert tokens(http) == expected[0]  # weights were kept in host memory (SGLang with a CPU backup)


def test_slime_release_resume_and_disk_update(http: httpx.Client, checkpoints: tuple[Path, Path],
                                              expected: tuple) -> None:
    # slime's SGLangEngine: release with {} (every tag), resume weights then kv_cache + cuda_graph, then
    # pause_generation, flush_cache, update_weights_from_disk {"model_path", "weight_version"}, continue_generation.
    assert http.post("/release_memory_occupation", json={}).status_code == 200
    assert set(states(http).values()) == {"paused"}
    assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    assert http.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]}).status_code == 200
    assert set(states(http).values()) == {"awake"}
    assert http.post("/pause_generation", json={}).status_code == 200
    assert http.get("/flush_cache").status_code == 200
    r = http.post("/update_weights_from_disk", json={"model_path": str(checkpoints[1]), "weight_version": "7"})
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert http.get("/get_weight_version").json() == {"weight_version": "7"}
    assert http.post("/continue_generation", json={}).status_code == 200
    assert tokens(http) == expected[1]


def test_disk_updates_through_the_compat_route_obey_weights_dir(http: httpx.Client, tmp_path: Path,
                                                                expected: tuple) -> None:
    r = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path)})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = http.post("/update_weights_from_disk", json={"model_path": "/x", "weight_version": "latest"})
    assert r.status_code == 400 and "weight_version" in r.json()["error"]["message"]
    assert tokens(http) == expected[0]


def test_pickled_tensor_updates_are_refused_with_the_way_to_send_buckets(http: httpx.Client) -> None:
    # The body slime and verl send (base64 of pickled tensors); never unpickled, whatever it holds.
    body = {"serialized_named_tensors": ["gASVAAAAAAAAAAA="], "load_format": None, "flush_cache": False}
    r = http.post("/update_weights_from_tensor", json=body)
    assert r.status_code == 400 and "ipc_bucket" in r.json()["error"]["message"]


def test_pause_generation_aborts_running_requests_and_holds_new_ones(http: httpx.Client, engine: Engine,
                                                                    server: ServerThread) -> None:
    results: dict[str, dict] = {}

    def generate(key: str, max_new_tokens: int) -> None:
        r = httpx.post(f"{server.url}/generate", timeout=120, json={
            "text": "Hi", "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}})
        results[key] = r.json()

    running = threading.Thread(target=generate, args=("running", 480))
    running.start()
    deadline = time.monotonic() + 60
    while not engine.memory_status()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.get("/flush_cache").status_code == 409  # SGLang's callers retry until the engine is idle
    r = http.post("/pause_generation", json={})
    assert r.status_code == 200 and r.json()["num_aborted"] == 1
    running.join(60)
    assert results["running"]["finish_reason"] == "abort" and len(results["running"]["output_ids"]) < 480
    held = threading.Thread(target=generate, args=("held", 4))
    held.start()
    time.sleep(0.3)
    assert "held" not in results and held.is_alive()  # waits for continue_generation
    assert http.post("/continue_generation", json={}).status_code == 200
    held.join(60)
    assert len(results["held"]["output_ids"]) == 4
    r = http.post("/pause_generation", json={"mode": "in_place"})
    assert r.status_code == 422 and "mode" in r.json()["error"]["message"]  # only SGLang's default, abort


def test_vllm_sleep_levels_and_staged_wake_up(http: httpx.Client, checkpoints: tuple[Path, Path],
                                              expected: tuple) -> None:
    # OpenRLHF: sleep (level 1), wake_up (all tags); /is_sleeping between.
    assert http.post("/sleep", params={"level": 1}).status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert http.post("/wake_up").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert tokens(http) == expected[0]
    # TRL: sleep(level=2) discards the weights; wake_up(tags=["weights"]), load new ones, wake_up(tags=["kv_cache"]).
    assert http.post("/sleep?level=2").status_code == 200
    assert http.post("/wake_up?tags=weights").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    r = http.post("/update_weights", json={"format": "safetensors", "path": str(checkpoints[1]), "version": 8})
    assert r.status_code == 200, r.text
    assert http.post("/wake_up?tags=kv_cache").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert http.post("/reset_prefix_cache").status_code == 200
    assert tokens(http) == expected[1]


@pytest.mark.parametrize("query, status", [({"level": 3}, 400), ({"level": 1, "mode": "keep"}, 422),
                                           ({"tags": "everything"}, 422)])
def test_bad_vllm_queries_are_refused_and_change_nothing(http: httpx.Client, query: dict, status: int) -> None:
    path = "/wake_up" if "tags" in query else "/sleep"
    r = http.post(path, params=query)
    assert r.status_code == status and r.json()["error"]["message"], r.text
    assert set(states(http).values()) == {"awake"}
