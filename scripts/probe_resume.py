"""Probe: the first cudaMalloc after releasing tens of GB waits for the driver (docs/benchmarks.md, "Resume from cpu").

Releases everything (weights to meta), then times the two allocations a resume makes, in both
orders, with and without 0.5 s of idle time in between. Needs CUDA.

    python scripts/probe_resume.py
"""
import time
import torch
from colocate import Engine, EngineConfig, SamplingParams

def t(f):  # (result, milliseconds) with the device synchronised around f
    torch.cuda.synchronize(); s = time.perf_counter(); r = f(); torch.cuda.synchronize(); return r, (time.perf_counter() - s) * 1e3

e = Engine(EngineConfig(model="qwen2.5-1.5b", kv_cache_fraction=0.5, max_model_len=2048))
g = SamplingParams(max_new_tokens=4, temperature=0.0)
e.generate([[1, 2, 3]], g)
m = e.memory
for cycle in range(4):
    e.release_memory(weights_to="meta")
    if cycle >= 2:
        time.sleep(0.5)  # does the driver finish something in the background after a large free?
    retries = torch.cuda.memory_stats()["num_alloc_retries"]
    _, tw = t(lambda: m.weights.materialize(m.device))
    _, tk = t(lambda: m.runner.allocate_kv_cache())
    print(f"cycle {cycle}: weights alloc {tw:.1f} ms, kv alloc {tk:.1f} ms, retries +{torch.cuda.memory_stats()['num_alloc_retries'] - retries}, reserved {torch.cuda.memory_reserved()/2**30:.1f} GiB")
    m.weights.to_meta(); torch.cuda.empty_cache()
    # the engine's own path, with and without graph capture in between
    r, tt = t(lambda: e.resume_memory(("weights", "kv_cache")))
    print(f"   resume(weights, kv) {tt:.1f} ms: " + ", ".join(f"{k} {v.seconds*1e3:.1f}" for k, v in r.tags.items()))
    _, tg = t(lambda: e.resume_memory(("cuda_graph",)))
    print(f"   graphs {tg:.1f} ms, retries total {torch.cuda.memory_stats()['num_alloc_retries']}")
# order swapped: kv first
for cycle in range(2):
    e.release_memory(weights_to="meta")
    _, tk = t(lambda: m.runner.allocate_kv_cache())
    _, tw = t(lambda: m.weights.materialize(m.device))
    print(f"kv first: kv {tk:.1f} ms, weights {tw:.1f} ms")
    m.weights.to_meta(); torch.cuda.empty_cache()
    e.resume_memory()
