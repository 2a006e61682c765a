"""Which process holds device memory after each phase of a colocated PPO iteration (nvidia-smi per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from colocate.engine import EngineConfig
from colocate.trainer import TrainerConfig
from colocate.ray.worker import ColocatedWorker, WorkerConfig
from colocate.rl import PPOConfig

GiB = 2**30


def per_process() -> str:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout
    return " ".join(line.replace(" ", "") for line in out.splitlines())


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
    dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
    config = WorkerConfig(engine=EngineConfig(model=model, device="cuda", max_model_len=320, kv_cache_fraction=0.5),
                          trainer=TrainerConfig(model=model, device="cuda", max_positions=320, param_dtype=dtype),
                          ppo=PPOConfig(rollout_batch_size=32, minibatch_size=8, ppo_epochs=1, lr=1e-6),
                          task_overrides={"max_new_tokens": 256})
    worker = ColocatedWorker(config, rank=0, world_size=1)
    print(f"trainer pid {os.getpid()}", flush=True)

    def show(name: str) -> None:
        free, total = torch.cuda.mem_get_info()
        print(f"{name:18s} used {(total - free) / GiB:6.2f} GiB | trainer alloc {torch.cuda.memory_allocated() / GiB:6.2f}"
              f" reserved {torch.cuda.memory_reserved() / GiB:6.2f} | per process {per_process()}", flush=True)

    show("start")
    worker.setup()
    show("setup")
    for it in range(2):
        for method, *args in [("generate", it), ("release_engine",), ("resume_trainer",), ("prepare",),
                              ("release_reference",), ("train",), ("release_trainer",), ("resume_engine", ("weights",)),
                              ("update_weights", it + 1), ("resume_engine", ("kv_cache", "cuda_graph"))]:
            getattr(worker, method)(*args)
            show(f"{it} {method}")
    worker.shutdown()


if __name__ == "__main__":
    main()
