"""Activation offloading on CUDA: the training step's peak falls by most of what was offloaded, gradients equal."""

from __future__ import annotations

import pytest
import torch

from colocate.model import DenseCausalAttention, load_model
from colocate.trainer.activations import ActivationOffload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def step(model: torch.nn.Module, ids: torch.Tensor, offload: ActivationOffload | None) -> tuple[int, list]:
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    b, t = ids.shape
    with offload if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(ids.flatten(), torch.arange(t, device="cuda").repeat(b),
                           DenseCausalAttention(batch_size=b, seq_len=t))
        loss = hidden.float().pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, [p.grad.float().clone() for p in model.parameters()]


def test_offload_lowers_the_training_peak_and_keeps_the_gradients() -> None:
    model = load_model("qwen2.5-0.5b", device="cuda", dtype=torch.float32, max_positions=1024)[0]
    model.train().requires_grad_(True)
    ids = torch.randint(0, 151_000, (4, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    step(model, ids, None)  # warm-up: kernels and the allocator's first blocks
    peak_plain, grads_plain = step(model, ids, None)
    offload = ActivationOffload(model, device=torch.device("cuda"))
    peak_off, grads_off = step(model, ids, offload)
    print(f"\nqwen2.5-0.5b, 4 x 1024 tokens: peak {peak_plain / 2**20:.0f} MiB -> {peak_off / 2**20:.0f} MiB "
          f"with {offload.stats.tensors} tensors ({offload.stats.bytes / 2**20:.0f} MiB) offloaded")
    assert offload.stats.bytes > 0
    assert peak_off < peak_plain - offload.stats.bytes // 2
    for a, b in zip(grads_plain, grads_off):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
