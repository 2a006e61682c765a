"""Where a decode step's time goes: GPU kernel time by kind vs wall time per step (CUDA)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from colocate import Engine, EngineConfig, SamplingParams


@dataclass(kw_only=True)
class ProfileConfig:
    model: str = "qwen2.5-1.5b"
    batch_sizes: tuple[int, ...] = (1, 64)
    steps: int = 32


def profile(cfg: ProfileConfig) -> None:
    engine = Engine(EngineConfig(model=cfg.model, kv_cache_fraction=0.3, max_model_len=1024))
    for bs in cfg.batch_sizes:
        prompts = [[(7 * i + j) % 1000 for j in range(32)] for i in range(bs)]
        params = SamplingParams(max_new_tokens=cfg.steps, temperature=0.0, ignore_eos=True)
        engine.generate(prompts, params)  # warm-up
        seqs = engine.add_requests(prompts, params)
        engine.step()  # prefill
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            n = 0
            while not all(s.is_finished for s in seqs):
                engine.step()
                n += 1
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / n
        events = prof.key_averages()
        gpu_total = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / n
        print(f"\n== {cfg.model} batch {bs}: wall {wall * 1e3:.3f} ms/step, GPU kernels {gpu_total / 1e3:.3f} ms/step")
        print(events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args()
    profile(ProfileConfig(model=a.model, batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")), steps=a.steps))


if __name__ == "__main__":
    main()
