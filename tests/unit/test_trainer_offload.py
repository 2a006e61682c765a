"""Trainer offload on CPU: a training step after offload/onload equals the same step without it, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from colocate.memory import TagState
from colocate.trainer import TrainerOffload
from colocate.model import DenseCausalAttention, build_model, init_random_weights, preset_config


def make_trainer(seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(preset_config("tiny"), device=device, dtype=torch.float32, max_positions=64)
    init_random_weights(model, seed=seed)
    model.requires_grad_(True).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    gen = torch.Generator().manual_seed(step)
    device = next(model.parameters()).device
    ids = torch.randint(0, 256, (2, 16), generator=gen).to(device)
    attn = DenseCausalAttention(batch_size=2, seq_len=16)
    hidden = model(ids.flatten(), torch.arange(16, device=device).repeat(2), attn)
    logits = model.compute_logits(hidden).view(2, 16, -1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    return loss.item()


def test_steps_after_offload_onload_are_bitwise_equal() -> None:
    ref_model, ref_opt = make_trainer()
    model, opt = make_trainer()
    offload = TrainerOffload(model, opt)
    params_before = list(model.parameters())
    for step in range(4):
        assert train_step(ref_model, ref_opt, step) == train_step(model, opt, step)
        report = offload.release()
        assert offload.state is TagState.PAUSED
        assert report.tags["params"].device_bytes == sum(p.numel() * 4 for p in model.parameters())
        assert report.tags["grads"].device_bytes == report.tags["params"].device_bytes
        assert report.tags["optimizer"].device_bytes >= 2 * report.tags["params"].device_bytes  # AdamW moments
        offload.resume()
    assert train_step(ref_model, ref_opt, 99) == train_step(model, opt, 99)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert list(model.parameters()) == params_before  # same Parameter objects: the optimizer still holds them
    assert offload.arena.num_allocations == 1


def test_onload_places_everything_in_one_buffer() -> None:
    model, opt = make_trainer()
    train_step(model, opt, 0)
    offload = TrainerOffload(model, opt)
    offload.release()
    offload.resume()
    buf = offload._device_buffer
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel()
    tensors = list(model.parameters()) + [p.grad for p in model.parameters()]
    tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert all(start <= t.data_ptr() < end for t in tensors)


def test_release_and_resume_twice_are_noops() -> None:
    model, opt = make_trainer()
    offload = TrainerOffload(model, opt)
    assert "no-op" in offload.resume().tags["trainer"].message
    offload.release()
    assert "no-op" in offload.release().tags["trainer"].message
    offload.resume()
    assert offload.state is TagState.AWAKE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cycles", [1, 3])
def test_cuda_offload_gives_the_memory_back_to_the_device(cycles: int) -> None:
    # Regression: offload emptied the cache while it still held its device tensors, so the
    # process kept them reserved (allocated 0, reserved unchanged) where no other process could use them.
    torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved()
    model, opt = make_trainer(device="cuda")
    offload = TrainerOffload(model, opt)
    for step in range(cycles):
        train_step(model, opt, step)
        offload.release()
        offload.resume()
    offload.release()
    assert torch.cuda.memory_allocated() < 1 << 20  # only the rotary tables stay
    assert torch.cuda.memory_reserved() <= reserved_before + (2 << 20)


def test_old_names_still_work_for_one_release_and_warn() -> None:
    model, opt = make_trainer()
    offload = TrainerOffload(model, opt)
    with pytest.warns(DeprecationWarning, match="release"):
        assert offload.offload().action == "release"
    with pytest.warns(DeprecationWarning, match="resume"):
        assert offload.onload().action == "resume"
    with pytest.warns(DeprecationWarning, match="colocate.trainer"):
        from colocate.memory import TrainerOffload as old  # noqa: F401
    assert old is TrainerOffload


@pytest.mark.parametrize("to", ["host", "disk"])
def test_weights_a_host_optimizer_keeps_are_released_into_its_copy(tmp_path, to: str) -> None:
    from colocate.trainer.host_optimizer import HostAdamW

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).to(torch.bfloat16)
    optimizer = HostAdamW(net.parameters(), lr=1e-2, state_dtype=torch.bfloat16, master_weights=False)
    x = torch.randn(16, 64).to(torch.bfloat16)
    net(x).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    want = [p.detach().clone() for p in net.parameters()]
    plain = TrainerOffload(copy.deepcopy(net), None)
    shared = TrainerOffload(net, None, host_copies=optimizer.host_copies(), disk_dir=tmp_path)
    plain.release()
    shared.release(to=to)
    # Nothing else took host memory for the weights: the arena holds what the plain offload's holds, minus them.
    assert shared.arena.nbytes == 0 < plain.arena.nbytes
    if to == "host":  # the weights are the optimizer's host copies now (readable, e.g. for an update from the host)
        assert all(p.data.data_ptr() == m.data_ptr() for p, m in zip(net.parameters(), optimizer.masters))
        net(x)
    else:  # on disk every released tensor is an empty stand-in; the copies wait in the optimizer
        assert all(p.numel() == 0 for p in net.parameters())
    shared.resume()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), want))
    net(x).float().pow(2).mean().backward()
    optimizer.step()  # and trains on after the round trip
    assert not all(torch.equal(p, w) for p, w in zip(net.parameters(), want))
    assert list(tmp_path.iterdir()) == []


def test_fp32_masters_of_bf16_weights_are_not_taken_for_the_weights() -> None:
    from colocate.trainer.host_optimizer import HostAdamW

    net = torch.nn.Linear(8, 8).to(torch.bfloat16)
    optimizer = HostAdamW(net.parameters(), lr=1e-2)  # fp32 masters
    assert optimizer.host_copies() == {}
    offload = TrainerOffload(net, None, host_copies={id(p): torch.zeros(p.shape) for p in net.parameters()})
    offload.release()
    assert offload.arena.nbytes > 0  # a copy of another dtype is not the weight: the arena takes it
    offload.resume()


@pytest.mark.parametrize("to", ["host", "disk"])
def test_shared_weights_released_with_their_gradients_come_back_with_them(tmp_path, to: str) -> None:
    # A weight is set before its gradient, which must match it: one pointing pass for shared and other tensors.
    from colocate.trainer.host_optimizer import HostAdamW

    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4)
    optimizer = HostAdamW(net.parameters(), lr=1e-2)  # fp32 weights: the masters are the weights
    net(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    want = [(p.detach().clone(), p.grad.clone()) for p in net.parameters()]
    offload = TrainerOffload(net, None, host_copies=optimizer.host_copies(), disk_dir=tmp_path)
    offload.release(to=to)
    offload.resume()
    assert all(torch.equal(p, w) and torch.equal(p.grad, g) for p, (w, g) in zip(net.parameters(), want))
