"""The GRPO trainer: no critic; each response's advantage is its score against its prompt's group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from colocate.rl import (GRPOConfig, RolloutBatch, group_advantages, grpo_loss, importance_weights, logprob_gap,
                         masked_mean)
from colocate.trainer.policy_trainer import PolicyTrainer, TrainerConfig


class GRPOTrainer(PolicyTrainer):
    """GRPO on rollouts of `group_size` consecutive responses per prompt; the same phases as PPOTrainer.

    >>> trainer = GRPOTrainer(TrainerConfig(model="tiny"), GRPOConfig(group_size=8, rollout_batch_size=128))
    >>> stats = trainer.prepare(batch)        # old logprobs (and reference logprobs if kl_coef > 0), advantages
    >>> stats |= trainer.train(batch)
    No value head and, with `kl_coef=0`, no reference model: the policy and AdamW are all it keeps.
    """

    def __init__(self, config: TrainerConfig, grpo: GRPOConfig, *, temperature: float = 1.0) -> None:
        super().__init__(config, grpo, temperature=temperature, has_value_head=False, has_reference=grpo.kl_coef > 0)
        self.grpo = grpo

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch) -> dict[str, float]:
        """Old logprobs, reference logprobs (with a KL term), and one advantage per sequence, broadcast to tokens."""
        grpo, mask = self.grpo, batch.response_mask
        if len(batch) % grpo.group_size:
            raise ValueError(f"a batch of {len(batch)} sequences is not whole groups of {grpo.group_size}; "
                             "generate group_size responses per prompt, next to each other")
        chunks = self._chunks(batch)
        scored = self.score_with_reward_model(batch)
        policy = [self._forward(self.policy.lm, chunk, with_entropy=True) for chunk in chunks]
        batch.old_logprobs = torch.cat([logprobs for logprobs, _, _ in policy])
        entropy = torch.cat([e for _, _, e in policy])
        if self.reference is not None:
            batch.ref_logprobs = torch.cat([self._forward(self.reference, chunk)[0] for chunk in chunks])
        advantages = group_advantages(batch.scores, grpo.group_size, scale_by_std=grpo.scale_by_std)  # [B]
        batch.advantages = advantages[:, None] * mask  # [B, R]: the loss reads column 0 as the sequence's
        groups = batch.scores.view(-1, grpo.group_size)
        stats = logprob_gap(batch.engine_logprobs, batch.old_logprobs, mask) | scored
        if grpo.tis_cap is not None:
            batch.is_weights, tis = importance_weights(batch.old_logprobs, batch.engine_logprobs, mask, cap=grpo.tis_cap)
            stats |= tis
        stats["entropy"] = masked_mean(entropy, mask).item()
        stats["score_std"] = batch.scores.std(unbiased=False).item()
        # Groups that teach nothing: every response scored the same, so every advantage is 0.
        stats["zero_std_group_fraction"] = (groups.std(dim=1, unbiased=False) <= 1e-6).float().mean().item()
        stats["response_length"] = mask.sum(1).mean().item()
        if batch.ref_logprobs is not None:
            stats["kl_to_reference"] = masked_mean(batch.old_logprobs - batch.ref_logprobs, mask).item()
        return stats

    def _loss(self, mb: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grpo, mask = self.grpo, mb.response_mask
        logprobs, _, _ = self._forward(self.policy.lm, mb)
        loss, stats = grpo_loss(logprobs, mb.old_logprobs, mb.advantages[:, 0], mask, clip_eps=grpo.clip_eps,
                                loss_norm=grpo.loss_norm, ref_logprobs=mb.ref_logprobs, kl_coef=grpo.kl_coef,
                                num_tokens=self._mean_tokens_per_worker(mask), weights=mb.is_weights)
        return loss, {"policy_loss": loss.detach(), **stats}

    def _mean_tokens_per_worker(self, mask: torch.Tensor) -> torch.Tensor:
        # Workers' minibatches hold different token counts; dividing each worker's sum by the mean
        # count makes the averaged gradient the gradient of the mean over every worker's tokens.
        count = mask.sum()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = count.clone()
            dist.all_reduce(count)
            count /= dist.get_world_size()
        return count
