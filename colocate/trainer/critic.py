"""A critic of its own: a causal LM and a value head, trained on PPO's value loss beside the policy, offloaded alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from colocate.model import CausalLM, DenseCausalAttention, load_model
from colocate.rl import RolloutBatch
from colocate.trainer.offload import TrainerOffload


class Critic(nn.Module):
    """`model` (a preset or a folder, any size) with a scalar head on its last hidden state; its own AdamW.

    >>> critic = Critic("qwen2.5-0.5b", device="cuda", dtype=torch.float32, lr=1e-5, max_positions=2048)
    >>> values = critic.values(batch, autocast)          # [B, R] float32, the value of each response position
    PPO with a separate critic trains both on one backward (the losses touch disjoint parameters) and
    steps each with its own optimizer; the critic's offload moves its weights, gradients and moments
    apart from the policy's, so a colocated loop can hold one of them on the device at a time.
    """

    def __init__(self, model: str, *, device: torch.device, dtype: torch.dtype, lr: float, max_positions: int,
                 seed: int = 0, offload_dir: str | None = None,
                 make_optimizer: Callable[[Iterable[nn.Parameter], float], Any] | None = None) -> None:
        super().__init__()
        self.lm: CausalLM = load_model(model, device=device, dtype=dtype, max_positions=max_positions,
                                       seed=seed + 1)[0].requires_grad_(True)
        self.value_head = nn.Linear(self.lm.config.hidden_size, 1, device=device, dtype=dtype)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: early advantages are the raw rewards
        nn.init.zeros_(self.value_head.bias)
        # torch's AdamW unless the trainer's config places optimizers on the host (`TrainerConfig.make_optimizer`)
        self.optimizer = (make_optimizer(self.parameters(), lr) if make_optimizer is not None
                          else torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0))
        # A host optimizer's state never leaves the host: the offload moves weights and gradients only.
        on_device = isinstance(self.optimizer, torch.optim.Optimizer)
        self.offload = TrainerOffload(self, self.optimizer if on_device else None, device=device, disk_dir=offload_dir,
                                      host_copies=None if on_device else self.optimizer.host_copies())

    def values(self, batch: RolloutBatch, autocast) -> torch.Tensor:
        """Values of the response positions [B, R], float32; no logits are made."""
        b, t = batch.input_ids.shape
        attn = DenseCausalAttention(batch_size=b, seq_len=t, attention_mask=batch.attention_mask)
        with autocast():
            hidden = self.lm(batch.input_ids.flatten(), batch.positions.flatten(), attn).view(b, t, -1)
            return self.value_head(batch.gather_response(hidden)).squeeze(-1).float()
