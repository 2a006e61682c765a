"""The HTTP server on a GPU, updated over /update_weights with a CUDA IPC manifest exported by another process."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from colocate import Engine, EngineConfig, SamplingParams, launch_engine  # noqa: E402
from colocate.model import load_model  # noqa: E402
from colocate.server.app import create_app  # noqa: E402
from colocate.server.serve import ServerThread  # noqa: E402
from colocate.weight_sync import export_manifest  # noqa: E402
from tests.gpu.test_weight_sync_gpu import _checkpoints  # noqa: E402

KEY = "gpu-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], list(range(10, 50)), [7] * 9]


def _config(model: str) -> EngineConfig:
    # A small KV cache: the engine shares the GPU with the producer and a reference engine.
    return EngineConfig(model=model, device="cuda", dtype="bfloat16", kv_cache_fraction=0.05, max_model_len=256)


def _expected(checkpoint: str) -> list[list[int]]:
    engine = Engine(_config(checkpoint))
    try:
        return [o.token_ids for o in engine.generate(PROMPTS, SamplingParams(**GREEDY))]
    finally:
        engine.shutdown()


def _producer(checkpoint: str, manifests: mp.Queue, release: mp.Event) -> None:
    """A trainer stand-in: B's weights on the GPU, exported as CUDA IPC buckets, kept alive until told."""
    model, _ = load_model(checkpoint, device="cuda", dtype=torch.bfloat16)
    manifest, buckets = export_manifest(model.hf_named_tensors(), dtype=torch.bfloat16, device="cuda",
                                        bucket_bytes=1 << 20)
    manifests.put(json.dumps(manifest.to_dict()))
    # The consumer has copied and closed every bucket once the HTTP call returned; only then release.
    release.wait(600)
    for bucket in buckets:
        bucket.release()


def _tokens(client: Any) -> list[list[int]]:
    r = client.post("/generate", json={"input_ids": PROMPTS, "sampling_params": GREEDY}, headers=AUTH)
    assert r.status_code == 200, r.text
    return [o["output_ids"] for o in r.json()]


def _check_ipc_update_over_http(checkpoints: tuple[str, str], expected_b: list[list[int]], where: str) -> None:
    engine = Engine(_config(checkpoints[0])) if where == "in-process" else launch_engine(_config(checkpoints[0]))
    ctx = mp.get_context("spawn")
    manifests, release = ctx.Queue(), ctx.Event()
    producer = ctx.Process(target=_producer, args=(checkpoints[1], manifests, release))
    try:
        with ServerThread(create_app(engine, api_key=KEY)) as server, \
                httpx.Client(base_url=server.url, timeout=300) as client:
            before = _tokens(client)
            assert before != expected_b, "checkpoints A and B must differ for this test to mean anything"
            producer.start()
            manifest = json.loads(manifests.get(timeout=300))
            assert len(manifest["buckets"]) > 3 and manifest["handles"][0]["kind"] == "cuda_ipc"
            r = client.post("/update_weights", json={"format": "ipc", "manifest": manifest, "version": 11},
                            headers=AUTH)
            assert r.status_code == 200, r.text
            print(f"{where}: {r.json()}")
            assert client.get("/health").json()["weights_version"] == 11
            assert _tokens(client) == expected_b
    finally:
        release.set()
        if producer.pid is not None:
            producer.join(120)
        engine.shutdown()
    assert producer.exitcode == 0, f"the producer process failed ({producer.exitcode=})"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return _checkpoints(tmp_path_factory.mktemp("server-gpu"))


@pytest.fixture(scope="module")
def expected_b(checkpoints: tuple[str, str]) -> list[list[int]]:
    return _expected(checkpoints[1])


@pytest.mark.parametrize("where", ["in-process", "engine-process"])
def test_ipc_update_over_http_from_another_process(checkpoints: tuple[str, str], expected_b: list[list[int]],
                                                   where: str) -> None:
    _check_ipc_update_over_http(checkpoints, expected_b, where)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = _checkpoints(Path(tmp))
        expected = _expected(ckpts[1])
        for where in ("in-process", "engine-process"):
            _check_ipc_update_over_http(ckpts, expected, where)
    print("ok")
