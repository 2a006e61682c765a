"""The trainer side of a colocated worker: PPO and GRPO trainers, their models, and the memory tiers of their state."""

from colocate.trainer.config import TrainerConfig
from colocate.trainer.grpo_trainer import GRPOTrainer
from colocate.trainer.offload import TrainerOffload
from colocate.trainer.policy_trainer import PolicyTrainer, PolicyWithValue
from colocate.trainer.ppo_trainer import PPOTrainer

__all__ = ["GRPOTrainer", "PPOTrainer", "PolicyTrainer", "PolicyWithValue", "TrainerConfig", "TrainerOffload"]
