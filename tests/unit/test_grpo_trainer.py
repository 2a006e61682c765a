"""The GRPO trainer and the supervised warm start on the tiny preset (CPU, no Ray): state, advantages, offload."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from colocate.rl import GRPOConfig, get_task
from colocate.rl.rollout import RolloutBatch
from colocate.trainer import GRPOTrainer, PPOTrainer, TrainerConfig
from colocate.trainer.sft import WarmStartConfig, demonstration_batch, warm_start

TINY = TrainerConfig(model="tiny", device="cpu", max_positions=64)
GRPO = GRPOConfig(group_size=4, rollout_batch_size=8, minibatch_size=4, ppo_epochs=1, lr=1e-3)


def grouped_batch(seed: int) -> RolloutBatch:
    """Two prompts, four responses each (lengths differ), scores with a spread in the first group only."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (5,), generator=gen).tolist()] * 4 + [torch.randint(0, 256, (3,),
                                                                                         generator=gen).tolist()] * 4
    responses = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (4, 2, 6, 1, 3, 3, 5, 2)]
    scores = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    logprobs = [[-1.0] * len(r) for r in responses]
    return RolloutBatch.collate(prompts, responses, logprobs, scores, pad_id=0)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_grpo_trainer_keeps_no_critic_and_a_reference_only_for_a_kl_term() -> None:
    plain = GRPOTrainer(TINY, GRPO)
    assert plain.policy.value_head is None and plain.reference is None
    assert plain.device_bytes() == param_bytes(plain.policy.lm)  # the policy and nothing else (no AdamW state yet)
    with_kl = GRPOTrainer(TINY, GRPOConfig(group_size=4, rollout_batch_size=8, minibatch_size=4, kl_coef=0.05))
    assert with_kl.reference is not None and not any(p.requires_grad for p in with_kl.reference.parameters())
    ppo = PPOTrainer(TINY, _ppo_config())
    assert ppo.device_bytes() > with_kl.device_bytes() > plain.device_bytes()  # PPO also holds the value head


def _ppo_config():
    from colocate.rl import PPOConfig

    return PPOConfig(rollout_batch_size=8, minibatch_size=4)


def test_prepare_gives_each_response_its_group_advantage_on_every_token() -> None:
    trainer = GRPOTrainer(TINY, GRPO)
    batch = grouped_batch(seed=0)
    stats = trainer.prepare(batch)
    # Group 1: scores 1, 0, 0, 1 -> +-1 (mean 0.5, std 0.5); group 2: all 0.5 -> 0.
    expected = torch.tensor([1.0, -1, -1, 1, 0, 0, 0, 0])[:, None] * batch.response_mask
    torch.testing.assert_close(batch.advantages, expected)
    assert stats["zero_std_group_fraction"] == 0.5
    assert stats["entropy"] > 5.0  # a random 320-token model: close to log(320) = 5.77
    assert batch.ref_logprobs is None and batch.old_values is None
    with pytest.raises(ValueError, match="whole groups"):
        trainer.prepare(batch.select(torch.arange(6)))


def test_train_moves_the_weights_and_offload_frees_everything() -> None:
    trainer = GRPOTrainer(TINY, GRPO)
    before = {name: t.clone() for name, t in trainer.named_weights()}
    batch = grouped_batch(seed=1)
    trainer.prepare(batch)
    stats = trainer.train(batch)
    assert trainer.num_steps == 2
    assert {"policy_loss", "grad_norm", "clip_fraction", "approx_kl"} <= stats.keys()
    assert all(math.isfinite(v) for v in stats.values()) and stats["grad_norm"] > 0
    moved = [name for name, t in trainer.named_weights() if not torch.equal(t, before[name])]
    assert moved, "the GRPO steps moved no weight"
    weights = param_bytes(trainer.policy.lm)
    resident = trainer.device_bytes()
    assert 0 <= resident - 4 * weights < 1024  # weights, gradients, AdamW's two moments (and its step counters)
    trainer.release()
    assert trainer.device_bytes() == 0
    trainer.resume()
    assert trainer.device_bytes() == resident - weights  # the gradients were dropped, everything else is back


def test_warm_start_lowers_the_loss_and_makes_the_reference_the_result() -> None:
    task = get_task("arithmetic", max_digits=1, ops="+", eval_fraction=0.2)
    trainer = GRPOTrainer(TINY, GRPOConfig(group_size=4, rollout_batch_size=8, minibatch_size=4, kl_coef=0.01))
    moments_before = len(trainer.optimizer.state)
    stats = warm_start(trainer, task, WarmStartConfig(num_steps=30, batch_size=16, lr=3e-3))
    assert stats["warm_start_loss_last"] < 0.7 * stats["warm_start_loss_first"], stats
    ref = dict(trainer.reference.named_parameters())
    assert all(torch.equal(p, ref[name]) for name, p in trainer.policy.lm.named_parameters())
    assert len(trainer.optimizer.state) == moments_before == 0  # RL's AdamW starts clean
    assert trainer.num_steps == 0  # warm-start steps are not RL steps
    # The demonstrations are what the score calls right.
    batch = demonstration_batch(task, 8, seed=0, pad_id=0)
    assert len(batch) == 8 and batch.response_mask.sum(1).min() >= 2  # a digit and the EOS at least


@pytest.mark.parametrize("kwargs,match", [({"num_steps": 0}, "num_steps"), ({"batch_size": 0}, "batch_size"),
                                          ({"lr": 0.0}, "lr"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")])
def test_warm_start_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WarmStartConfig(**kwargs)


def test_warm_start_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = WarmStartConfig(num_steps=100, lr=1e-3, min_lr_ratio=0.1)
    lrs = [config.lr_at(step) for step in range(100)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)  # 5 warm-up steps
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def test_rl_learning_rate_warms_up_linearly_over_the_first_steps() -> None:
    trainer = GRPOTrainer(TINY, GRPOConfig(group_size=4, rollout_batch_size=8, minibatch_size=4, lr=1e-3,
                                           lr_warmup_steps=4))
    lrs = []
    for seed in range(3):
        batch = grouped_batch(seed)
        trainer.prepare(batch)
        trainer.train(batch)  # two steps each
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # steps 1-4 at 1/4 ... 4/4 of lr, then lr
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        GRPOConfig(lr_warmup_steps=-1)
