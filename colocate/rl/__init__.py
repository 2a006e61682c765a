"""PPO building blocks (GAE, clipped losses, KL to the reference), rollout batches and tasks; torch only."""

from colocate.rl.ppo import (PPOConfig, compute_gae, kl_penalty, logprob_gap, masked_mean, policy_loss, shaped_rewards,
                             token_logprobs, value_loss, whiten)
from colocate.rl.rollout import RolloutBatch
from colocate.rl.tasks import TASKS, RepeatLetterTask, Task, get_task

__all__ = ["TASKS", "PPOConfig", "RepeatLetterTask", "RolloutBatch", "Task", "compute_gae", "get_task", "kl_penalty",
           "logprob_gap", "masked_mean", "policy_loss", "shaped_rewards", "token_logprobs", "value_loss", "whiten"]
