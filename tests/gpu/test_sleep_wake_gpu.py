"""Sleep/wake on a CUDA device: memory really returned, identical outputs with graphs, recovery from OOM on resume."""

from __future__ import annotations

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.engine.memory_manager import ResumeOutOfMemoryError
from colocate.memory import TagState

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], list(range(10, 50)), [7] * 9, list(range(100, 103))]


def _baseline_free() -> int:
    # CUDA context, cuBLAS handle and workspace exist before the engine: not its footprint.
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def _tokens(engine: Engine, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


def test_paused_engine_returns_99_percent_of_its_footprint() -> None:
    free_before = _baseline_free()
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_fraction=0.3, max_model_len=1024))
    _tokens(engine)
    # A bucketed update first: its cached plan holds views into the weights, which must not
    # keep them alive past the release.
    named = [(n, t.clone()) for n, t in engine.runner.model.hf_named_tensors()]
    engine.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in named])
    engine.load_weight_bucket(named)
    engine.finish_weight_update()
    del named
    torch.cuda.empty_cache()
    free_awake = torch.cuda.mem_get_info()[0]
    footprint = free_before - free_awake
    report = engine.release_memory(weights_to="cpu")
    free_paused = torch.cuda.mem_get_info()[0]
    left = free_before - free_paused
    print(f"footprint {footprint / 2**30:.2f} GiB, left while paused {left / 2**20:.1f} MiB "
          f"({100 * left / footprint:.3f}%); release {report}")
    assert footprint > engine.runner.kv.nbytes + engine.memory.weights.nbytes
    assert left <= 0.01 * footprint
    # mem_get_info counts whole pages: within 1% of the buffer.
    assert report.tags["weights"].device_bytes >= 0.99 * engine.memory.weights.nbytes
    engine.resume_memory()
    engine.shutdown()


def _segment_with_a_live_tensor(nbytes: int) -> torch.Tensor:
    """Leave a cached segment of `nbytes` with a small live tensor cut from it (what a trainer step leaves)."""
    big = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    del big  # cached, not returned
    return torch.empty(32 << 20, dtype=torch.uint8, device="cuda")


def test_a_release_frees_its_bytes_even_beside_a_segment_another_tensor_holds() -> None:
    # The engine's buffers would be cut from the 4 GiB segment's free part; a release could then give back
    # nothing, since the live tensor keeps the segment. Each buffer has a segment of its own instead.
    torch.cuda.empty_cache()
    keeper = _segment_with_a_live_tensor(4 << 30)
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_bytes=1 << 30, max_model_len=256, max_num_seqs=16))
    try:
        weights, kv = engine.memory.weights.nbytes, engine.runner.kv.nbytes
        free_before = torch.cuda.mem_get_info()[0]
        report = engine.release_memory(weights_to="cpu")
        freed = torch.cuda.mem_get_info()[0] - free_before
        assert report.tags["weights"].device_bytes >= 0.99 * weights
        assert report.tags["kv_cache"].device_bytes >= 0.99 * kv
        assert freed >= 0.99 * (weights + kv)
        engine.resume_memory()
        assert engine.generate([[1, 2, 3]], GREEDY)[0].token_ids
    finally:
        engine.shutdown()
        del keeper


@pytest.mark.parametrize("weights_to", ["cpu", "meta"])
def test_outputs_identical_after_round_trips_with_graphs(weights_to: str) -> None:
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_fraction=0.2, max_model_len=512))
    assert engine.runner.graphs is not None
    greedy, sampled = _tokens(engine), _tokens(engine, SAMPLED)
    host_copy = [(n, t.to("cpu", copy=True)) for n, t in engine.runner.model.hf_named_tensors()]
    ptr = engine.memory.weights.buffer.data_ptr()
    for _ in range(3):
        engine.release_memory(weights_to=weights_to)
        assert engine.runner.graphs is None and engine.memory.weights.buffer is None
        engine.resume_memory(("weights",))
        if weights_to == "meta":
            engine.update_weights(host_copy)
        engine.resume_memory(("kv_cache", "cuda_graph"))
        assert engine.runner.graphs is not None  # captured again for the new addresses
        assert _tokens(engine) == greedy
        assert _tokens(engine, SAMPLED) == sampled
    print(f"weights buffer moved: {ptr != engine.memory.weights.buffer.data_ptr()}")
    engine.shutdown()


def test_partial_tags_keep_outputs() -> None:
    engine = Engine(EngineConfig(model="tiny", kv_cache_fraction=0.05, max_model_len=512))
    expected = _tokens(engine)
    for tags in [("kv_cache",), ("weights",), ("cuda_graph",)]:
        engine.release_memory(tags)
        engine.resume_memory(tags)
        assert engine.memory.is_awake and engine.runner.graphs is not None, tags
        assert _tokens(engine) == expected, tags
    engine.shutdown()


def test_out_of_memory_on_resume_recovers() -> None:
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_fraction=0.3, max_model_len=1024))
    expected = _tokens(engine)
    engine.release_memory(weights_to="cpu")
    # Another tenant takes the memory: leave less than the weights need.
    free = torch.cuda.mem_get_info()[0]
    hog = torch.empty(free - engine.memory.weights.nbytes // 2, dtype=torch.uint8, device="cuda")
    free_with_hog = torch.cuda.mem_get_info()[0]
    with pytest.raises(ResumeOutOfMemoryError, match="needs") as err:
        engine.resume_memory()
    print(err.value)
    assert all(s is TagState.PAUSED for s in engine.state.values())
    assert torch.cuda.mem_get_info()[0] >= free_with_hog - (64 << 20)  # what the attempt took was freed
    # Weights fit but the KV cache does not: the weights taken by this call are given back too.
    del hog
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    hog = torch.empty(free - engine.memory.weights.nbytes - (256 << 20), dtype=torch.uint8, device="cuda")
    with pytest.raises(ResumeOutOfMemoryError, match="kv_cache"):
        engine.resume_memory()
    assert engine.state["weights"] is TagState.PAUSED and engine.memory.weights.buffer is None
    del hog
    torch.cuda.empty_cache()
    engine.resume_memory()
    assert _tokens(engine) == expected
    engine.shutdown()


if __name__ == "__main__":
    test_paused_engine_returns_99_percent_of_its_footprint()
    for mode in ("cpu", "meta"):
        test_outputs_identical_after_round_trips_with_graphs(mode)
    test_partial_tags_keep_outputs()
    test_out_of_memory_on_resume_recovers()
    print("ok")


def test_memory_limit_caps_the_process_and_sizes_the_kv_cache_within_it() -> None:
    from colocate.memory.device import limit_device_memory

    torch.cuda.empty_cache()
    limit = 3 << 30
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_fraction=0.5, max_model_len=256, memory_limit=limit))
    try:
        assert torch.cuda.memory_reserved() <= limit  # weights, KV pool and graphs all within the cap
        assert engine.runner.kv.nbytes < limit - engine.memory.weights.nbytes
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(limit, dtype=torch.uint8, device="cuda")  # past the cap, however free the device is
        assert engine.generate([[1, 2, 3]], GREEDY)[0].token_ids
    finally:
        engine.shutdown()
        limit_device_memory("cuda", None)
