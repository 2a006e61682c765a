"""Trainer memory tiers on CUDA: activation offload lowers the step's peak with the same gradients; the host
AdamW keeps its state off the device and takes the device AdamW's steps."""

from __future__ import annotations

import pytest
import torch

from colocate.model import DenseCausalAttention, load_model
from colocate.trainer.activations import ActivationOffload
from colocate.trainer.host_optimizer import HostAdamW
from colocate.trainer.offload import TrainerOffload

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


def test_host_adamw_keeps_its_state_off_the_device_and_matches_device_adamw() -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(64, 1024, device="cuda")
    optimizers = [torch.optim.AdamW(nets[0].parameters(), lr=1e-3), HostAdamW(nets[1].parameters(), lr=1e-3)]
    held = []
    for net, optimizer in zip(nets, optimizers):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            net(x).pow(2).mean().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        held.append(sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor) and v.is_cuda))
    param_bytes = sum(p.numel() * p.element_size() for p in nets[0].parameters())
    assert held[0] >= 2 * param_bytes and held[1] == 0  # the device AdamW's moments; none for the host one
    host = optimizers[1]
    assert all(t.is_pinned() for t in (*host.masters, *host.exp_avg, *host.exp_avg_sq))  # 16 MiB ones: exact-size
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_exact_size_pinned_memory_copies_asynchronously_and_is_given_back() -> None:
    from colocate.memory.host import pinned_empty, resident_bytes
    nbytes = (112 << 20) + 4096  # torch's pinned pool would take 256 MiB for this
    host = pinned_empty(nbytes)
    assert host.is_pinned() and host.numel() == nbytes
    host.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        device = host.to("cuda", non_blocking=True)
        back = pinned_empty(nbytes)
        back.copy_(device, non_blocking=True)
    stream.synchronize()
    assert torch.equal(back, host)
    rss = resident_bytes()
    del back, host  # unregistered and unmapped, not kept in a pool
    assert rss - resident_bytes() >= 2 * nbytes * 0.95


def test_disk_tier_streams_through_two_chunks_and_resumes_bit_exact(tmp_path) -> None:
    from colocate.trainer.disk_tier import DiskTier

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)]).cuda()  # 0.4 GB of fp32
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(8, 2048, device="cuda")).pow(2).mean().backward()
    optimizer.step()
    before = [t.clone() for t in list(net.parameters())[:3]] + [optimizer.state[p]["exp_avg"].clone()
                                                                for p in list(net.parameters())[:3]]
    offload = TrainerOffload(net, optimizer, disk_dir=tmp_path)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    report = offload.release(to="disk")
    freed = allocated - torch.cuda.memory_allocated()
    state_bytes = sum(t.device_bytes for t in report.tags.values())
    assert freed >= state_bytes > 4 * 24 * 2048 * 2048 * 4 * 0.99  # params, grads, two moments
    assert offload.arena.nbytes == 0 and len(offload.disk._bounce) == 2  # host memory: two chunks
    assert sum(b.numel() for b in offload.disk._bounce) == 2 * DiskTier.CHUNK
    offload.resume()
    first = list(net.parameters())[:3]
    after = first + [optimizer.state[p]["exp_avg"] for p in first]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and not list(tmp_path.iterdir())


def test_a_streamed_reference_scores_like_a_resident_one_on_the_gpu() -> None:
    from colocate.rl import PPOConfig, RolloutBatch, get_task
    from colocate.trainer import PPOTrainer, TrainerConfig

    task, ppo = get_task("repeat_letter"), PPOConfig(rollout_batch_size=8, minibatch_size=4)
    prompts = task.sample_prompts(8, seed=0)
    responses = [list(range(100 + i, 110 + i)) for i in range(8)]
    scores, held = [], []
    for fraction in (0.0, 0.5):
        trainer = PPOTrainer(TrainerConfig(model="qwen2.5-0.5b", device="cuda", max_positions=64,
                                           reference_offload=fraction), ppo)
        held.append(trainer.reference_offload.device_bytes())
        batch = RolloutBatch.collate(prompts, responses, [[0.0] * 10] * 8, [0.0] * 8, pad_id=trainer.pad_id,
                                     device="cuda")
        trainer.prepare(batch)
        scores.append(batch.ref_logprobs.clone())
        del trainer, batch
        torch.cuda.empty_cache()
    assert torch.equal(scores[0], scores[1])  # the same kernels on the same weights
    assert held[1] < 0.75 * held[0]  # the embedding stays resident; half the layers do not


def test_a_trainer_release_frees_its_resumed_buffer_beside_a_segment_another_tensor_holds() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).cuda()  # 128 MiB of fp32
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(8, 2048, device="cuda")).sum().backward()
    optimizer.step()
    offload = TrainerOffload(net, optimizer)
    offload.release()
    torch.cuda.empty_cache()
    big = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    del big  # cached; the resume's flat buffer would be cut from it, beside the live tensor below
    keeper = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    offload.resume()
    state = offload.device_bytes()
    free_before = torch.cuda.mem_get_info()[0]
    offload.release()
    freed = torch.cuda.mem_get_info()[0] - free_before
    assert state >= 4 * (128 << 20)  # params, grads and both moments
    assert freed >= 0.99 * state, (freed, state)
    del keeper
