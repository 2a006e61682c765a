"""What a trainer builds: `TrainerConfig` (the model, its device and precision, and its memory tiers)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from colocate.dtypes import DTYPES, parse_dtype
from colocate.memory.layer_stream import check_fraction
from colocate.trainer.host_optimizer import HostAdamW

# Parameter dtypes a trainer keeps (fp16 would need loss scaling, which the trainer does not do).
PARAM_DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True)
class TrainerConfig:
    """What the trainer builds: the model (preset or folder), where, and in which precision.

    >>> TrainerConfig(model="tiny", device="cpu")                      # float32 on CPU
    >>> TrainerConfig(model="qwen2.5-0.5b", device="cuda", param_dtype="float32")  # bf16 autocast
    `param_dtype` is what parameters, gradients and AdamW moments are stored in. On CUDA the
    forward runs under bfloat16 autocast either way, and the reference model is kept in
    bfloat16; "bfloat16" parameters halve the trainer's memory for the largest models.
    """

    model: str = "tiny"
    device: str = "cpu"
    param_dtype: str = "float32"
    seed: int = 0  # presets: random weights from this seed, the same on every worker
    max_positions: int = 2048
    # Tensors a training forward saves for backward wait in pinned host memory (`trainer.activations`).
    offload_activations: bool = False
    # "host": AdamW's moments and fp32 master weights live in host memory and the step runs there
    # (`trainer.host_optimizer.HostAdamW`); "device": torch's AdamW next to the parameters.
    optimizer: str = "device"
    # With optimizer="host": the dtype AdamW's moments are kept in ("bfloat16": rounded stochastically, 4 bytes a
    # parameter instead of 8), and whether fp32 master weights are kept (False: the host's copy of the weights
    # has the parameters' dtype, updates rounded stochastically). See `trainer.host_optimizer`.
    optimizer_state_dtype: str = "float32"
    master_weights: bool = True
    # A folder: released state goes to a file there instead of staying in host memory (`TrainerOffload`'s
    # disk tier), for models whose state exceeds the host's memory. None: host memory.
    offload_dir: str | None = None
    # The fraction of the frozen reference's decoder layers kept in pinned host memory and streamed to the
    # device for its forward (`memory.layer_stream`), as the engine's weights_offload: it never holds more
    # than the rest of its weights and two layers on the device. 0: all resident.
    reference_offload: float = 0.0
    # PPO: a preset or folder for a critic of its own (a causal LM and a value head, its own AdamW and offload)
    # instead of a value head on the policy. None: the value head on the policy.
    critic_model: str | None = None
    # A preset or folder (an HF sequence-classification checkpoint with one label) whose score of prompt +
    # response is the reward, in place of the task's (which is still logged); `reward_offload` of its layers
    # stream from host memory like the reference's. None: the task's programmatic reward.
    reward_model: str | None = None
    reward_offload: float = 0.0
    # CUDA: bytes this process may hold on its device (the caching allocator's cap, set when the trainer is
    # built), e.g. a device budget shared with an engine in another process. None: no cap. No effect on CPU.
    memory_limit: int | None = None

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float) -> Any:
        """AdamW for a trained model as this config places it: torch's on the device, or `HostAdamW`."""
        if self.optimizer == "host":
            return HostAdamW(params, lr=lr, weight_decay=0.0, state_dtype=DTYPES[self.optimizer_state_dtype],
                             master_weights=self.master_weights, seed=self.seed)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def __post_init__(self) -> None:
        parse_dtype(self.param_dtype, "param_dtype", allowed=PARAM_DTYPES)
        check_fraction("reference_offload", self.reference_offload)
        check_fraction("reward_offload", self.reward_offload)
        if self.optimizer not in ("device", "host"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'device' or 'host'")
        if self.memory_limit is not None and (type(self.memory_limit) is not int or self.memory_limit < 1):
            raise ValueError(f"memory_limit={self.memory_limit!r} must be a positive number of bytes or None")
        if self.optimizer_state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"optimizer_state_dtype={self.optimizer_state_dtype!r} must be 'float32' or 'bfloat16'")
        if self.optimizer != "host" and (self.optimizer_state_dtype != "float32" or not self.master_weights):
            raise ValueError("optimizer_state_dtype and master_weights apply to the host optimizer: set "
                             "optimizer='host' too")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or a CUDA device such as 'cuda'")
