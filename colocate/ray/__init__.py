"""One actor per GPU holding a PPO trainer and an engine side by side, and the group the driver talks to.

Importing this package does not import Ray; `WorkerGroup` does, when it is built.
"""

from colocate.ray.group import WorkerCrashedError, WorkerGroup
from colocate.trainer import PolicyWithValue, PPOTrainer, TrainerConfig
from colocate.ray.worker import ColocatedWorker, WorkerConfig

__all__ = ["ColocatedWorker", "PPOTrainer", "PolicyWithValue", "TrainerConfig", "WorkerConfig", "WorkerCrashedError",
           "WorkerGroup"]
