"""What a trainer builds: `TrainerConfig` (the model, its device and precision, and its memory tiers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.dtypes import parse_dtype
from colocate.memory.layer_stream import check_fraction

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

    def __post_init__(self) -> None:
        parse_dtype(self.param_dtype, "param_dtype", allowed=PARAM_DTYPES)
        check_fraction("reference_offload", self.reference_offload)
        check_fraction("reward_offload", self.reward_offload)
        if self.optimizer not in ("device", "host"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'device' or 'host'")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or a CUDA device such as 'cuda'")
