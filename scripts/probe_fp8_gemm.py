"""Probe of fp8 GEMM options on the lent GPU: bf16 F.linear against torch._scaled_mm (rowwise scales), with the
per-token activation quantization as separate torch ops and without it, for decoder projection shapes.

    python scripts/probe_fp8_gemm.py
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

SHAPES = {"qwen2.5-1.5b": {"qkv": (1536, 2048), "o": (1536, 1536), "gate_up": (1536, 17920), "down": (8960, 1536)},
          "qwen2.5-7b": {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}}
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def bench(fn, iters: int = 200) -> float:
    """Microseconds per call, replayed from a CUDA graph (launch overhead out, as in decode graphs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters // 10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX  # [M, 1]
    return (x / scale).to(FP8), scale


def main() -> None:
    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(dev), "rows": []}
    for model, shapes in SHAPES.items():
        for name, (k, n) in shapes.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            w_scale = w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX  # [N, 1] per output channel
            wq = (w / w_scale).to(FP8)
            for m in (1, 4, 16, 64, 256):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                xq, x_scale = quantize_rows(x)
                bf16_us = bench(lambda: F.linear(x, w))
                mm_us = bench(lambda: torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(),
                                                       out_dtype=torch.bfloat16))

                def quant_mm() -> torch.Tensor:
                    a, s = quantize_rows(x)
                    return torch._scaled_mm(a, wq.t(), scale_a=s, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
                full_us = bench(quant_mm)
                row = {"model": model, "proj": name, "m": m, "bf16_us": round(bf16_us, 2),
                       "scaled_mm_us": round(mm_us, 2), "quant_and_scaled_mm_us": round(full_us, 2),
                       "bf16_weight_read_us_at_4.3TBps": round(2 * n * k / 4.3e12 * 1e6, 2)}
                out["rows"].append(row)
                print(row, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_fp8_gemm.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
