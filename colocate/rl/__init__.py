"""PPO building blocks (GAE, clipped losses, KL to the reference) and programmatic tasks; torch only."""

from colocate.rl.ppo import (PPOConfig, compute_gae, kl_penalty, logprob_gap, masked_mean, policy_loss, shaped_rewards,
                             token_logprobs, value_loss, whiten)
from colocate.rl.tasks import TASKS, RepeatLetterTask, Task, get_task

__all__ = ["TASKS", "PPOConfig", "RepeatLetterTask", "Task", "compute_gae", "get_task", "kl_penalty", "logprob_gap",
           "masked_mean", "policy_loss", "shaped_rewards", "token_logprobs", "value_loss", "whiten"]
