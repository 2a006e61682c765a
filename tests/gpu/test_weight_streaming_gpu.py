"""weights_offload on CUDA: streamed layers (copies captured in the decode graphs) give the resident engine's greedy
tokens, across sleep/wake and an update, with fp8 too; the device holds only the resident part and the staging."""

from __future__ import annotations

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], list(range(10, 50)), [7] * 9, list(range(100, 103)), list(range(500, 520))]


def make(**kwargs) -> Engine:
    return Engine(EngineConfig(**{"model": "qwen2.5-0.5b", "kv_cache_bytes": 1 << 30, "max_model_len": 256,
                                  "max_num_seqs": 16, **kwargs}))


def tokens(engine: Engine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def resident() -> dict:
    engine = make()
    try:
        weights = [(n, t.clone()) for n, t in engine.runner.model.hf_named_tensors()]
        nbytes = engine.memory_status()["device_bytes"]["weights"]
        return {"tokens": tokens(engine), "weights": weights, "bytes": nbytes}
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("offload", "prefetch"), [(0.5, 2), (1.0, 2), (1.0, 1), (0.25, 3)])
def test_streamed_decode_in_graphs_gives_the_resident_tokens(resident: dict, offload: float, prefetch: int) -> None:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = make(weights_offload=offload, weights_prefetch=prefetch)
    try:
        assert engine.runner.graphs is not None  # decode runs in graphs, the copies inside them
        assert tokens(engine) == resident["tokens"]
        status = engine.memory_status()
        streamed, staging = status["host_bytes"]["weights_offloaded"], status["device_bytes"]["weights_staging"]
        assert status["device_bytes"]["weights"] + streamed >= resident["bytes"] - (1 << 20)
        assert status["device_bytes"]["weights"] <= resident["bytes"] - streamed + (1 << 20)
        held = torch.cuda.memory_allocated() - before  # weights, staging, KV pool, graphs' static inputs
        assert held < resident["bytes"] - streamed + staging + (1 << 30) + (256 << 20)
        params = engine.runner.model.model.layers[engine.runner.streamer.indices[0]].parameters()
        assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    finally:
        engine.shutdown()


def test_streamed_engine_survives_sleep_wake_and_an_update(resident: dict) -> None:
    engine = make(weights_offload=0.5)
    try:
        report = engine.release_memory(weights_to="cpu")
        assert report.tags["weights"].device_bytes > 0
        engine.resume_memory()
        assert tokens(engine) == resident["tokens"]
        engine.release_memory(weights_to="meta")
        engine.resume_memory()
        engine.update_weights(resident["weights"], version=3)  # streamed layers written in pinned host memory
        assert tokens(engine) == resident["tokens"]
    finally:
        engine.shutdown()


def test_fp8_weights_stream_too() -> None:
    plain, streamed = make(quantization="fp8"), None
    try:
        want = tokens(plain)
        plain.shutdown()
        streamed = make(quantization="fp8", weights_offload=0.5)
        assert tokens(streamed) == want
        layer = streamed.runner.model.model.layers[streamed.runner.streamer.indices[0]]
        assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn and layer.mlp.down_proj.weight.is_pinned()
    finally:
        plain.shutdown()
        if streamed is not None:
            streamed.shutdown()
