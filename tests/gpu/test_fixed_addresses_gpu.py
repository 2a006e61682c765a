"""Fixed addresses across sleep (CUDA VMM): graphs captured once stay valid through 20 release/resume cycles."""

from __future__ import annotations

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.memory.vmm import FixedBuffer, is_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], list(range(10, 40)), [7] * 9]


def test_fixed_buffer_keeps_its_address_and_gives_memory_back() -> None:
    assert is_available(torch.device("cuda"))
    buf = FixedBuffer(1 << 30, torch.device("cuda"), chunk_bytes=256 << 20)
    x = buf.tensor.view(torch.float32)
    ptr = x.data_ptr()
    x.fill_(1.0)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1.0)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        x.add_(1.0)
    free_mapped = torch.cuda.mem_get_info()[0]
    assert buf.unmap() == buf.reserved_bytes
    freed = torch.cuda.mem_get_info()[0] - free_mapped
    assert freed >= 0.99 * (1 << 30), freed
    buf.map()
    x.fill_(5.0)
    graph.replay()  # captured on the old physical memory, replayed on the new at the same address
    torch.cuda.synchronize()
    assert x.data_ptr() == ptr and bool((x == 6.0).all())
    buf.close()


def test_graphs_captured_once_survive_20_cycles() -> None:
    engine = Engine(EngineConfig(model="qwen2.5-0.5b", kv_cache_fraction=0.2, max_model_len=512, max_num_seqs=16,
                                 fixed_addresses=True))
    try:
        graphs = engine.runner.graphs
        assert graphs is not None
        reference = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        weights_ptr = engine.memory.weights.buffer.data_ptr()
        kv_ptr = engine.runner.kv.tensor.data_ptr()
        host = [(n, t.to("cpu", copy=True)) for n, t in engine.runner.model.hf_named_tensors()]
        footprint = engine.memory.weights.nbytes + engine.runner.kv.nbytes
        for cycle in range(20):
            weights_to = "cpu" if cycle % 2 == 0 else "meta"
            free_awake = torch.cuda.mem_get_info()[0]
            report = engine.release_memory(weights_to=weights_to)
            freed = torch.cuda.mem_get_info()[0] - free_awake
            assert freed >= 0.99 * footprint, (cycle, freed, footprint, str(report))
            if weights_to == "meta":
                engine.resume_memory(("weights",))
                engine.update_weights(host, version=cycle)
                engine.resume_memory(("kv_cache", "cuda_graph"))
            else:
                engine.resume_memory()
            assert engine.runner.graphs is graphs, f"cycle {cycle}: the graphs were captured again"
            assert engine.memory.weights.buffer.data_ptr() == weights_ptr
            assert engine.runner.kv.tensor.data_ptr() == kv_ptr
            assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == reference, cycle
    finally:
        engine.shutdown()
