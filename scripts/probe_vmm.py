"""Probe of fixed-address device buffers (colocate.memory.vmm) on a GPU: correctness under a captured graph,
memory really freed, and how long mapping and unmapping take, in chunks, right after a free and later.

    python scripts/probe_vmm.py --gib 40 --chunk-gib 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from colocate.memory.vmm import FixedBuffer


def ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=40.0)
    p.add_argument("--chunk-gib", type=float, default=2.0)
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)
    out: dict = {"device": torch.cuda.get_device_name(dev)}

    # 1. A graph captured on the buffer replays correctly after unmap + map; the memory really goes.
    small = FixedBuffer(1 << 30, dev)
    x = small.tensor.view(torch.float32)
    x.fill_(1.0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x.add_(1.0)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        x.add_(1.0)
    ptr = x.data_ptr()
    free0 = torch.cuda.mem_get_info(dev)[0]
    small.unmap()
    free1 = torch.cuda.mem_get_info(dev)[0]
    small.map()
    x.fill_(5.0)
    graph.replay()
    torch.cuda.synchronize()
    out["graph_after_remap_ok"] = bool((x == 6.0).all().item()) and x.data_ptr() == ptr
    out["freed_by_unmap_bytes"] = free1 - free0
    small.close()

    # 2. Timings of a large range: first map, unmap, map again at once, unmap, wait, map again.
    nbytes, chunk = int(args.gib * 2**30), int(args.chunk_gib * 2**30)
    t = time.perf_counter()
    big = FixedBuffer(nbytes, dev, chunk_bytes=chunk)
    out["first_map_ms"] = (time.perf_counter() - t) * 1e3
    out["unmap_ms"] = ms(big.unmap)
    chunk_ms = []
    for i in range(len(big._handles)):
        def one(i: int = i) -> None:
            with big._current():
                big._map_chunk(i)
        chunk_ms.append(ms(one))
    out["remap_at_once_chunk_ms"] = [round(c, 2) for c in chunk_ms]
    out["remap_at_once_ms"] = sum(chunk_ms)
    out["unmap_again_ms"] = ms(big.unmap)
    time.sleep(0.5)
    out["remap_after_0.5s_ms"] = ms(big.map)
    out["unmap_third_ms"] = ms(big.unmap)
    # The same size through the caching allocator, right after that free, for comparison.
    torch.cuda.empty_cache()
    out["cudamalloc_after_free_ms"] = ms(lambda: torch.empty(nbytes, dtype=torch.uint8, device=dev))
    torch.cuda.empty_cache()
    out["remap_after_cudamalloc_free_ms"] = ms(big.map)
    big.close()
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_vmm.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
