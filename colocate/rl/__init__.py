"""RL building blocks: PPO (GAE, clipped losses, KL to the reference), GRPO (group advantages), rollout batches, tasks."""

from colocate.rl.grpo import GRPOConfig, group_advantages, grpo_loss
from colocate.rl.ppo import (PPOConfig, clipped_surrogate, compute_gae, importance_weights, kl_penalty, logprob_gap,
                             masked_mean,
                             normalize_advantages, policy_loss, shaped_rewards, token_entropy, token_logprobs,
                             value_loss, whiten)
from colocate.rl.rollout import RolloutBatch
from colocate.rl.tasks import TASKS, RepeatLetterTask, Task, get_task

__all__ = ["TASKS", "GRPOConfig", "PPOConfig", "RepeatLetterTask", "RolloutBatch", "Task", "clipped_surrogate",
           "compute_gae", "get_task", "group_advantages", "grpo_loss", "importance_weights", "kl_penalty", "logprob_gap", "masked_mean",
           "normalize_advantages", "policy_loss", "shaped_rewards", "token_entropy", "token_logprobs", "value_loss",
           "whiten"]
