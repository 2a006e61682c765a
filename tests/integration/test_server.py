"""The HTTP server on CPU: a real uvicorn on a free loopback port around an in-process tiny Engine."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from colocate import Engine, EngineConfig, SamplingParams, launch_engine  # noqa: E402
from colocate.model import load_model  # noqa: E402
from colocate.server.app import create_app  # noqa: E402
from colocate.server.serve import ServerThread  # noqa: E402
from colocate.weight_sync import export_manifest  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_BYTES = 1 << 20
PROMPTS = ["Hello world", "colocate"]
GREEDY = {"max_new_tokens": 8, "temperature": 0.0}
PAUSED_WAIT_S = 2.0


@pytest.fixture(scope="module")
def expected_b(checkpoints: tuple[Path, Path]) -> list[list[int]]:
    engine = Engine(EngineConfig(model=str(checkpoints[1]), device="cpu", max_model_len=256))
    try:
        return [o.token_ids for o in engine.generate(PROMPTS, SamplingParams(**GREEDY))]
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def engine(checkpoints: tuple[Path, Path]) -> Iterator[Engine]:
    engine = Engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=256,
                                 paused_wait_s=PAUSED_WAIT_S))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine: Engine, checkpoints: tuple[Path, Path]) -> Iterator[ServerThread]:
    app = create_app(engine, api_key=KEY, max_body_bytes=MAX_BODY_BYTES, weights_dirs=[str(checkpoints[0].parent)])
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server: ServerThread, engine: Engine, checkpoints: tuple[Path, Path]) -> Iterator[httpx.Client]:
    version = engine.weights_version
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
    # Whatever a test did, the next one starts awake on checkpoint A.
    engine.resume_memory()
    if engine.weights_version != version or engine.memory_status()["num_missing_weights"]:
        engine.update_weights_from_disk(str(checkpoints[0]), version=engine.weights_version)


@pytest.fixture(scope="module")
def expected_a(server: ServerThread) -> list[list[int]]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        return tokens(client)


def tokens(client: httpx.Client) -> list[list[int]]:
    r = client.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY}, headers=AUTH)
    assert r.status_code == 200, r.text
    return [out["output_ids"] for out in r.json()]


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "type", "message"}, body
    assert body["error"]["message"], body
    return body["error"]["message"]


# -- endpoints ---------------------------------------------------------------------------
def test_generate_single_and_batched(client: httpx.Client, expected_a: list[list[int]]) -> None:
    r = client.post("/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY}, headers=AUTH)
    assert r.status_code == 200
    single = r.json()
    assert isinstance(single, dict) and set(single) == {"output_ids", "text", "logprobs", "finish_reason",
                                                        "top_logprobs", "prompt_logprobs", "prompt_top_logprobs"}
    assert single["output_ids"] == expected_a[0]
    assert len(single["logprobs"]) == len(single["output_ids"]) and single["finish_reason"] in ("length", "stop")
    assert isinstance(single["text"], str)
    ids = list(PROMPTS[1].encode())  # the tiny preset's tokenizer is bytes
    r = client.post("/generate", json={"input_ids": [ids], "sampling_params": GREEDY}, headers=AUTH)
    assert r.status_code == 200 and isinstance(r.json(), list) and r.json()[0]["output_ids"] == expected_a[1]
    r = client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}, headers=AUTH)
    assert r.json()["output_ids"] == expected_a[1]


def test_generate_n_responses_share_the_prompt(client: httpx.Client) -> None:
    """`n` in sampling_params: n outputs per prompt, prompt-major, each the output of seed + i alone."""
    sampled = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    r = client.post("/generate", json={"text": PROMPTS[0], "sampling_params": {**sampled, "seed": 40, "n": 3}},
                    headers=AUTH)
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 3
    alone = [client.post("/generate", json={"text": PROMPTS[0], "sampling_params": {**sampled, "seed": 40 + i}},
                         headers=AUTH).json()["output_ids"] for i in range(3)]
    assert [o["output_ids"] for o in r.json()] == alone
    bad = client.post("/generate", json={"text": "x", "sampling_params": {"n": 0}}, headers=AUTH)
    assert bad.status_code == 400 and "n=0" in bad.text


def test_openai_completions_and_models(client: httpx.Client, expected_a: list[list[int]]) -> None:
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and len(models["data"]) == 1
    name = models["data"][0]["id"]
    body = {"model": name, "prompt": PROMPTS, "max_tokens": 8, "temperature": 0.0, "n": 2, "logprobs": 1,
            "user": "ignored-extra-field"}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == name
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy: the n samples agree
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 8 and lp["text_offset"][0] == 0
    assert out["usage"]["completion_tokens"] == 32
    assert out["usage"]["prompt_tokens"] == sum(len(p.encode()) for p in PROMPTS)
    # A stop string cuts the text before it and finishes with "stop".
    full = out["choices"][0]["text"]
    stop = full[3:5]
    r = client.post("/v1/completions", json={**body, "prompt": PROMPTS[0], "n": 1, "stop": [stop]}, headers=AUTH)
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.find(stop)] and choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["tokens"]) <= len(full.encode())
    r = client.post("/v1/completions", json={"prompt": "x", "suffix": "y"}, headers=AUTH)
    assert r.status_code == 400 and "suffix" in error_of(r)


def test_pause_resume_health_memory(client: httpx.Client) -> None:
    health = client.get("/health").json()  # open without the key
    assert health["is_awake"] and set(health["state"].values()) == {"awake"} and "weights_version" in health
    before = client.get("/memory").json()
    assert before["device_bytes"]["kv_cache"] > 0 and before["device_bytes"]["weights"] > 0
    r = client.post("/pause", json={"tags": ["kv_cache", "weights"], "weights_to": "cpu"}, headers=AUTH)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["action"] == "release" and report["tags"]["weights"]["state_after"] == "paused"
    memory = client.get("/memory").json()
    assert memory["device_bytes"]["kv_cache"] == 0 and memory["device_bytes"]["weights"] == 0
    assert memory["host_bytes"]["weights"] == before["device_bytes"]["weights"]
    health = client.get("/health").json()
    assert not health["is_awake"] and health["state"]["weights"] == "paused"
    again = client.post("/pause", headers=AUTH).json()  # pausing what is paused is a no-op that says so
    assert "no-op" in again["tags"]["weights"]["message"]
    r = client.post("/resume", json={"tags": "weights"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["tags"]["weights"]["state_after"] == "awake"
    assert client.post("/resume", headers=AUTH).status_code == 200
    assert client.get("/health").json()["is_awake"]


def test_auth(client: httpx.Client) -> None:
    calls = [("POST", "/generate", {"text": "hi"}), ("POST", "/v1/completions", {"prompt": "hi"}),
             ("GET", "/v1/models", None), ("POST", "/pause", {}), ("POST", "/resume", {}),
             ("POST", "/update_weights", {"format": "safetensors", "path": "/nonexistent"})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert "API key" in error_of(r)
    assert client.get("/health").json()["is_awake"]  # the refused /pause did nothing
    assert client.post("/generate", json={"text": "hi", "sampling_params": GREEDY}, headers=AUTH).status_code == 200
    for path in ("/health", "/memory", "/metrics"):
        assert client.get(path).status_code == 200


def test_request_while_paused_completes_after_resume(client: httpx.Client, expected_a: list[list[int]]) -> None:
    assert client.post("/pause", json={"weights_to": "cpu"}, headers=AUTH).status_code == 200
    result: dict = {}

    def send() -> None:
        result["response"] = client.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY},
                                         headers=AUTH)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # waiting for resume, not refused
    assert client.post("/resume", headers=AUTH).status_code == 200
    thread.join(30)
    r = result["response"]
    assert r.status_code == 200 and [o["output_ids"] for o in r.json()] == expected_a


def test_request_paused_too_long_gets_503_with_retry_after(client: httpx.Client) -> None:
    assert client.post("/pause", headers=AUTH).status_code == 200
    start = time.monotonic()
    r = client.post("/generate", json={"text": "hi"}, headers=AUTH)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "paused" in error_of(r)
    assert time.monotonic() - start >= PAUSED_WAIT_S * 0.9


def test_meta_pause_refuses_generate_until_updated(client: httpx.Client, checkpoints, expected_a) -> None:
    assert client.post("/pause", json={"weights_to": "meta"}, headers=AUTH).status_code == 200
    assert client.post("/resume", headers=AUTH).status_code == 200
    r = client.post("/generate", json={"text": "hi"}, headers=AUTH)
    assert r.status_code == 409, r.text
    r = client.post("/update_weights", json={"format": "safetensors", "path": str(checkpoints[0]), "version": 2},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    assert tokens(client) == expected_a


def test_load_100_concurrent_generates_while_pausing(client: httpx.Client, server: ServerThread,
                                                     expected_a: list[list[int]]) -> None:
    num_requests = 100
    reports: list[dict] = []
    paused_spans: list[tuple[float, float]] = []  # from sending /pause to /resume's answer

    def pause_resume() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as control:
            for i in range(10):
                start = time.perf_counter()
                paused = control.post("/pause", json={"mode": "abort" if i % 2 else "wait", "timeout_s": 60},
                                      headers=AUTH)
                time.sleep(0.05)
                resumed = control.post("/resume", headers=AUTH)
                paused_spans.append((start, time.perf_counter()))
                assert (paused.status_code, resumed.status_code) == (200, 200), (paused.text, resumed.text)
                reports.append(paused.json())
                time.sleep(0.1)

    async def send_all() -> list[tuple[float, float, httpx.Response]]:
        limits = httpx.Limits(max_connections=num_requests + 10, max_keepalive_connections=num_requests + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as aclient:
            async def one(i: int) -> tuple[float, float, httpx.Response]:
                await asyncio.sleep(0.02 * i)  # arrivals spread over the pause cycles
                sent = time.perf_counter()
                r = await aclient.post("/generate", headers=AUTH, json={
                    "text": PROMPTS[i % 2], "sampling_params": {**GREEDY, "max_new_tokens": 16 + i % 17}})
                return sent, time.perf_counter(), r
            return await asyncio.gather(*(one(i) for i in range(num_requests)))

    controller = threading.Thread(target=pause_resume)
    start = time.perf_counter()
    controller.start()
    results = asyncio.run(send_all())
    controller.join(120)
    seconds = time.perf_counter() - start
    assert len(reports) == 10  # every cycle answered 200 twice
    assert len(results) == num_requests  # none lost
    responses = [r for _, _, r in results]
    statuses = [r.status_code for r in responses]
    assert all(s in (200, 503) for s in statuses), statuses
    assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 503)
    finished = [r.json()["finish_reason"] for r in responses if r.status_code == 200]
    assert set(finished) <= {"length", "stop", "abort"}
    assert finished.count("abort") == sum(rep["num_aborted"] for rep in reports)
    num_straddling = sum(any(sent < end and begin < done for begin, end in paused_spans) for sent, done, _ in results)
    assert num_straddling >= 10, "the load did not overlap the pauses; the test proves nothing"
    print(f"\n100 concurrent generates over 10 pause/resume cycles: {seconds:.1f} s; {statuses.count(200)} x 200 "
          f"({finished.count('abort')} aborted by a pause), {statuses.count(503)} x 503; {num_straddling} "
          f"straddled a pause; slowest pause+resume {max(e - b for b, e in paused_spans):.2f} s")
    assert tokens(client) == expected_a


# -- weight updates ------------------------------------------------------------------------
def test_safetensors_update_changes_outputs(client: httpx.Client, checkpoints, expected_a, expected_b) -> None:
    assert expected_a != expected_b
    r = client.post("/update_weights", json={"format": "safetensors", "path": str(checkpoints[1]), "version": 4},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 4 and client.get("/health").json()["weights_version"] == 4
    assert tokens(client) == expected_b


def _manifest(checkpoint: Path, keep: list) -> dict:
    trainer, _ = load_model(str(checkpoint), device="cpu", dtype=torch.float32)
    # Shared memory on CPU.
    manifest, buckets = export_manifest(trainer.hf_named_tensors(), dtype=torch.float32, device="cpu",
                                        bucket_bytes=1 << 20)
    keep.extend(buckets)
    return manifest.to_dict()


def test_ipc_update_changes_outputs(client: httpx.Client, checkpoints, expected_a, expected_b) -> None:
    keep: list = []
    try:
        manifest = _manifest(checkpoints[1], keep)
        assert len(manifest["buckets"]) > 1
        r = client.post("/update_weights", json={"format": "ipc", "manifest": manifest, "version": 7}, headers=AUTH)
        assert r.status_code == 200, r.text
    finally:
        for bucket in keep:
            bucket.release()
    assert client.get("/health").json()["weights_version"] == 7
    assert tokens(client) == expected_b


@pytest.mark.parametrize("case", ["unknown format", "missing path", "path is a file", "malformed manifest",
                                  "wrongly shaped tensor", "bogus shm name", "vanished shm handle",
                                  "conflicting versions", "manifest not an object", "pickle bytes"])
def test_refused_updates_change_nothing(client: httpx.Client, checkpoints, expected_a, case: str) -> None:
    assert tokens(client) == expected_a
    version = client.get("/health").json()["weights_version"]
    keep: list = []
    try:
        if case == "unknown format":
            body = {"format": "pickle", "path": str(checkpoints[1])}
        elif case == "missing path":
            body = {"format": "safetensors", "path": str(checkpoints[1] / "no-such-folder")}
        elif case == "path is a file":
            body = {"format": "safetensors", "path": str(checkpoints[1] / "config.json")}
        elif case == "manifest not an object":
            body = {"format": "ipc", "manifest": [1, 2, 3]}
        elif case == "pickle bytes":
            body = {"format": "ipc", "manifest": {"format": "colocate.weights/1", "version": 1,
                                                  "buckets": "gASVAAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOULg=="}}
        else:
            manifest = _manifest(checkpoints[1], keep)
            body = {"format": "ipc", "manifest": manifest, "version": 3}
            if case == "malformed manifest":
                manifest["buckets"][0]["tensors"][0]["offset"] = 3  # not aligned
            elif case == "wrongly shaped tensor":
                slot = manifest["buckets"][-1]["tensors"][-1]
                slot["shape"] = [1] * len(slot["shape"])
            elif case == "bogus shm name":
                manifest["handles"][-1]["name"] = "../../etc/passwd"
            elif case == "vanished shm handle":
                keep.pop().release()  # the last bucket is gone before the server opens it
            elif case == "conflicting versions":
                manifest["version"] = 5
        r = client.post("/update_weights", json=body, headers=AUTH)
    finally:
        for bucket in keep:
            bucket.release()
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    assert error_of(r)
    assert client.get("/health").json()["weights_version"] == version
    assert tokens(client) == expected_a


def test_server_around_an_engine_process(checkpoints, expected_a, expected_b) -> None:
    """The same app in front of launch_engine: generate, completions, pause/resume, an IPC update, 503."""
    engine = launch_engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=256,
                                        paused_wait_s=0.5))
    keep: list = []
    try:
        with ServerThread(create_app(engine, api_key=KEY)) as server, \
                httpx.Client(base_url=server.url, timeout=120) as client:
            assert tokens(client) == expected_a
            r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stop": "zz", "logprobs": 0},
                            headers=AUTH)
            assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 4, r.text
            # Streamed from the child: the chunks add up to the whole answer.
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "n": 2}
            whole = client.post("/v1/chat/completions", json=body, headers=AUTH).json()
            r = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=AUTH)
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
            for i in range(2):
                assert "".join(c["delta"].get("content", "") for c in chunks if c["index"] == i) == \
                    whole["choices"][i]["message"]["content"]
            assert client.post("/pause", json={"weights_to": "cpu"}, headers=AUTH).status_code == 200
            r = client.post("/generate", json={"text": "hi"}, headers=AUTH)
            assert r.status_code == 503 and r.headers["Retry-After"]
            r = client.post("/update_weights", json={"format": "ipc", "manifest": _manifest(checkpoints[1], keep)},
                            headers=AUTH)
            assert r.status_code == 409 and "paused" in error_of(r)  # weights paused: refused, nothing changed
            assert client.post("/resume", headers=AUTH).status_code == 200
            assert tokens(client) == expected_a
            r = client.post("/update_weights", json={"format": "ipc", "manifest": _manifest(checkpoints[1], keep),
                                                     "version": 2}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert tokens(client) == expected_b and client.get("/health").json()["weights_version"] == 2
            assert 'colocate_tag_awake{tag="kv_cache"} 1.0' in client.get("/metrics").text
    finally:
        for bucket in keep:
            bucket.release()
        engine.shutdown()


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("params, field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                           ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -3}, "top_k"),
                                           ({"temperature": "hot"}, "temperature"), ({"nope": 1}, "nope"),
                                           ({"seed": 1 << 70}, "seed")])
def test_bad_sampling_params(client: httpx.Client, params: dict, field: str) -> None:
    r = client.post("/generate", json={"text": "hi", "sampling_params": params}, headers=AUTH)
    assert r.status_code in (400, 422), r.text
    assert field in error_of(r)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2", b"", b"\xff\xfe", b'{"text": "hi", "input_ids": [1]}',
                                  b'{"input_ids": [99999]}', b'{"text": 5}', b'{"input_ids": [[]]}'])
def test_malformed_requests_are_4xx(client: httpx.Client, body: bytes) -> None:
    r = client.post("/generate", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    error_of(r)


def test_oversized_bodies_get_413(client: httpx.Client) -> None:
    big = b'{"text": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    r = client.post("/generate", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in error_of(r)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"text": "'
        for _ in range(20):
            yield b"x" * (MAX_BODY_BYTES // 16)
        yield b'"}'

    r = client.post("/update_weights", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in error_of(r)
    assert client.get("/health").status_code == 200


def test_metrics(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/generate", json={"text": "hi", "sampling_params": GREEDY}, headers=AUTH)
    client.post("/pause", headers=AUTH)
    client.post("/resume", headers=AUTH)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("colocate_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['colocate_requests_total{method="POST",route="/generate",status="200"}'] >= 3
    assert samples["colocate_generated_tokens_total"] >= 24
    assert samples['colocate_tag_awake{tag="weights"}'] == 1
    assert samples['colocate_device_bytes{tag="kv_cache"}'] > 0
    assert samples['colocate_pauses_total{outcome="ok"}'] >= 1 and samples['colocate_resumes_total{outcome="ok"}'] >= 1
    assert samples["colocate_pause_duration_seconds_count"] >= 1
    assert samples["colocate_engine_up"] == 1
    assert 'colocate_host_bytes{tag="weights"}' in samples


# -- the command line ----------------------------------------------------------------------
@pytest.mark.parametrize("stop_signal, flags", [(signal.SIGINT, []), (signal.SIGTERM, ["--engine-process"])])
def test_cli_serves_and_stops_on_a_signal(stop_signal: signal.Signals, flags: list[str]) -> None:
    with socket.socket() as sock:  # a free port (a tiny race with other processes is acceptable in a test)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "colocate", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(port), "--api-key", KEY, "--max-model-len", "128", "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"{url}/generate", json={"text": "hi", "sampling_params": GREEDY}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8
        assert httpx.post(f"{url}/generate", json={"text": "hi"}, timeout=60).status_code == 401
    finally:
        proc.send_signal(stop_signal)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    # One start-up line says what is served, where, and whether a key guards it.
    assert "colocate: serving tiny as 'tiny' (float32 on cpu); max_model_len 128 (as configured)" in stderr
    assert f"127.0.0.1:{port}; API key on" in stderr


def test_cli_refuses_public_host_without_key() -> None:
    proc = subprocess.run([sys.executable, "-m", "colocate", "serve", "--host", "0.0.0.0", "--model", "tiny"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "--api-key" in proc.stderr and "0.0.0.0" in proc.stderr


def test_python_client_drives_the_staged_cycle(client: httpx.Client, server: ServerThread, checkpoints,
                                               expected_a, expected_b) -> None:
    from colocate.client import Client, ServerError

    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    with Client(server.url, api_key=KEY) as trainer_client:
        with pytest.raises(ServerError) as err:
            Client(server.url, api_key="wrong").pause()
        assert err.value.status == 401
        trainer_client.pause(weights_to="meta")
        trainer_client.resume(["weights"])
        result = trainer_client.update_weights(trainer.hf_named_tensors(), version=11, bucket_bytes=1 << 20)
        assert result["version"] == 11
        trainer_client.resume(["kv_cache", "cuda_graph"])
        outs = trainer_client.generate(PROMPTS, SamplingParams(max_new_tokens=GREEDY["max_new_tokens"],
                                                               temperature=0.0))
        assert [o["output_ids"] for o in outs] == expected_b
        assert trainer_client.health()["weights_version"] == 11
        assert "colocate_" in trainer_client.metrics()
