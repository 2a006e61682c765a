"""PPO with a critic of its own (TrainerConfig.critic_model): values come from it, one backward trains both
models, each steps with its own AdamW, and release/resume move the critic's state too."""

from __future__ import annotations

import torch

from colocate.rl import PPOConfig, RolloutBatch, get_task
from colocate.trainer import PPOTrainer, TrainerConfig


def batch(trainer: PPOTrainer) -> RolloutBatch:
    prompts = get_task("repeat_letter").sample_prompts(8, seed=0)
    responses = [[65 + i, 66, 258] for i in range(8)]
    return RolloutBatch.collate(prompts, responses, [[0.0] * 3] * 8, [1.0, 0.0] * 4, pad_id=trainer.pad_id)


def test_a_separate_critic_learns_the_values_and_moves_with_the_trainer() -> None:
    ppo = PPOConfig(rollout_batch_size=8, minibatch_size=8, lr=1e-3, kl_coef=0.0, value_clip_eps=None)
    trainer = PPOTrainer(TrainerConfig(model="tiny", max_positions=64, critic_model="tiny"), ppo)
    assert trainer.policy.value_head is None and trainer.critic is not None
    policy_before = trainer.policy.lm.model.layers[0].mlp.down_proj.weight.detach().clone()
    critic_before = trainer.critic.lm.model.layers[0].mlp.down_proj.weight.detach().clone()
    losses = []
    for _ in range(6):
        b = batch(trainer)
        trainer.prepare(b)
        stats = trainer.train(b)
        losses.append(stats["value_loss"])
        assert stats["critic_grad_norm"] > 0
    assert losses[-1] < 0.5 * losses[0], losses  # the critic fits the returns of this batch
    assert not torch.equal(policy_before, trainer.policy.lm.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(critic_before, trainer.critic.lm.model.layers[0].mlp.down_proj.weight)
    weights = sum(p.numel() * p.element_size() for p in trainer.critic.parameters())
    steps = 4 * len(list(trainer.critic.parameters()))  # AdamW's step counters, one float each
    assert trainer.critic.offload.device_bytes() == 4 * weights + steps  # weights, gradients, two moments
    trainer.release()
    assert trainer.device_bytes() == 0 and trainer.critic.offload.device_bytes() == 0
    trainer.resume()
    assert trainer.critic.offload.device_bytes() == 3 * weights + steps  # gradients are dropped at release
    values = trainer.critic.values(batch(trainer), trainer._autocast)
    assert values.shape == (8, 3) and torch.isfinite(values).all()


def test_without_a_critic_model_the_value_head_sits_on_the_policy() -> None:
    trainer = PPOTrainer(TrainerConfig(model="tiny", max_positions=64), PPOConfig(rollout_batch_size=8,
                                                                                 minibatch_size=8))
    assert trainer.critic is None and trainer.policy.value_head is not None
