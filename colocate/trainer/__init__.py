"""The trainer side of a colocated worker: the PPO trainer, its models, and the memory tiers its state moves through."""

from colocate.trainer.offload import TrainerOffload
from colocate.trainer.ppo_trainer import PolicyWithValue, PPOTrainer, TrainerConfig

__all__ = ["PPOTrainer", "PolicyWithValue", "TrainerConfig", "TrainerOffload"]
