"""The PPO trainer: a value head beside the policy, KL-shaped rewards, GAE, clipped policy and value losses."""

from __future__ import annotations

import torch

from colocate.dtypes import DTYPES
from colocate.rl import (
    PPOConfig,
    RolloutBatch,
    compute_gae,
    importance_weights,
    logprob_gap,
    masked_mean,
    normalize_advantages,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from colocate.trainer.critic import Critic
from colocate.trainer.policy_trainer import PolicyTrainer, TrainerConfig


class PPOTrainer(PolicyTrainer):
    """Scores a rollout and runs PPO epochs on it; offloads its whole device state between iterations.

    >>> trainer = PPOTrainer(TrainerConfig(model="tiny"), PPOConfig())
    >>> stats = trainer.prepare(batch)        # old logprobs, values, reference logprobs, GAE
    >>> stats |= trainer.train(batch)         # ppo_epochs over minibatches, one AdamW step each
    >>> engine.update_weights(trainer.named_weights(), version=1)
    """

    def __init__(self, config: TrainerConfig, ppo: PPOConfig, *, temperature: float = 1.0) -> None:
        super().__init__(config, ppo, temperature=temperature, has_value_head=config.critic_model is None,
                         has_reference=True)
        self.ppo = ppo
        if config.critic_model is not None:
            self.critic = Critic(config.critic_model, device=self.device, dtype=DTYPES[config.param_dtype], lr=ppo.lr,
                                 max_positions=config.max_positions, seed=config.seed, offload_dir=config.offload_dir,
                                 make_optimizer=config.make_optimizer)

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch) -> dict[str, float]:
        """Fill the batch with old logprobs, values, reference logprobs, rewards and advantages."""
        ppo, mask = self.ppo, batch.response_mask
        chunks = self._chunks(batch)
        scored = self.score_with_reward_model(batch)
        policy = [self._forward(self.policy.lm, chunk, value_head=self.policy.value_head, with_entropy=True)
                  for chunk in chunks]
        batch.old_logprobs = torch.cat([logprobs for logprobs, _, _ in policy])
        batch.old_values = torch.cat([values for _, values, _ in policy] if self.critic is None
                                     else [self.critic.values(chunk, self._autocast) for chunk in chunks])
        entropy = torch.cat([e for _, _, e in policy])
        batch.ref_logprobs = torch.cat([self._forward(self.reference, chunk)[0] for chunk in chunks])
        rewards = shaped_rewards(batch.scores, batch.old_logprobs, batch.ref_logprobs, mask,
                                 kl_coef=ppo.kl_coef, kl_kind=ppo.kl_kind, max_kl=ppo.max_kl)
        advantages, batch.returns = compute_gae(rewards, batch.old_values, mask, gamma=ppo.gamma, lam=ppo.lam)
        batch.advantages = normalize_advantages(advantages, mask, ppo.advantage_norm)
        stats = logprob_gap(batch.engine_logprobs, batch.old_logprobs, mask) | scored
        if ppo.tis_cap is not None:
            batch.is_weights, tis = importance_weights(batch.old_logprobs, batch.engine_logprobs, mask, cap=ppo.tis_cap)
            stats |= tis
        stats["entropy"] = masked_mean(entropy, mask).item()
        stats["kl_to_reference"] = masked_mean(batch.old_logprobs - batch.ref_logprobs, mask).item()
        stats["value_mean"] = masked_mean(batch.old_values, mask).item()
        stats["score_std"] = batch.scores.std(unbiased=False).item()
        stats["advantage_std"] = masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item()
        return stats

    def _loss(self, mb: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ppo, mask = self.ppo, mb.response_mask
        logprobs, values, _ = self._forward(self.policy.lm, mb, value_head=self.policy.value_head)
        if self.critic is not None:
            values = self.critic.values(mb, self._autocast)
        p_loss, p_stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, clip_eps=ppo.clip_eps,
                                      weights=mb.is_weights)
        v_loss, v_stats = value_loss(values, mb.old_values, mb.returns, mask, clip_eps=ppo.value_clip_eps)
        return p_loss + ppo.value_coef * v_loss, {"policy_loss": p_loss.detach(), "value_loss": v_loss.detach(),
                                                  **p_stats, **v_stats}
