"""AdamW stepped on the host: the same weights as torch's AdamW, masters in fp32, and the trainer option."""

from __future__ import annotations

import pytest
import torch

from colocate.trainer.host_optimizer import HostAdamW


def model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(dtype)


def train(net: torch.nn.Module, optimizer: object, steps: int = 6) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen).to(next(net.parameters()).dtype)
        optimizer.zero_grad(set_to_none=True)
        net(x).float().pow(2).mean().backward()
        optimizer.step()


def test_host_step_matches_torch_adamw_in_fp32() -> None:
    ours, theirs = model(torch.float32), model(torch.float32)
    train(ours, HostAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1))
    train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    assert not torch.equal(next(ours.parameters()), next(model(torch.float32).parameters()))  # it did train


def test_bf16_parameters_follow_fp32_masters() -> None:
    """bf16 weights are the rounding of fp32 masters trained like an fp32 model (within bf16 gradient noise)."""
    ours, reference = model(torch.bfloat16), model(torch.float32)
    reference.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    start = [p.detach().clone() for p in reference.parameters()]
    optimizer = HostAdamW(ours.parameters(), lr=1e-3)
    train(ours, optimizer)
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0))
    for p, master, r, r0 in zip(ours.parameters(), optimizer.masters, reference.parameters(), start):
        assert master.dtype == torch.float32 and torch.equal(p, master.to(torch.bfloat16))
        # Adam moves each weight about lr a step; bf16 gradients flip a few of those steps, not most.
        assert (master - r).abs().mean() < 0.25 * (r - r0).abs().mean()
    assert all(v.device.type == "cpu" for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def test_trainer_with_the_host_optimizer_trains_like_the_device_one() -> None:
    from colocate.rl import PPOConfig
    from colocate.trainer import PPOTrainer, TrainerConfig
    from tests.unit.test_rollout_trainer import random_batch

    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, kl_coef=0.01)
    trainers = [PPOTrainer(TrainerConfig(model="tiny", max_positions=64, optimizer=o), ppo) for o in ("device", "host")]
    for trainer in trainers:
        batch = random_batch(seed=0)
        trainer.prepare(batch)
        trainer.train(batch)
        trainer.release()
        trainer.resume()
    for (_, a), (_, b) in zip(trainers[0].named_weights(), trainers[1].named_weights()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        TrainerConfig(optimizer="gpu")
