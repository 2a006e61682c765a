"""Supervised warm start: next-token training on a task's demonstrations, in the RL trainer's own policy."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from colocate.rl import RolloutBatch, Task, masked_mean
from colocate.trainer.policy_trainer import PolicyTrainer


@dataclass(kw_only=True)
class WarmStartConfig:
    """A short supervised run before RL, so RL starts from a model that is sometimes right.

    >>> WarmStartConfig(num_steps=300, batch_size=64, lr=1e-3)
    Each step trains on `batch_size` fresh prompts of the task's train split and their
    demonstrations (per worker); the learning rate warms up linearly over the first 5% of steps,
    then follows a cosine down to `lr * min_lr_ratio`. AdamW's moments are dropped afterwards,
    so RL starts with a fresh optimizer state, and the reference becomes the warm-started model.
    """

    num_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be > 0, or None for no gradient clipping")

    def lr_at(self, step: int) -> float:
        warmup = max(1, self.num_steps // 20)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.num_steps - warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def demonstration_batch(task: Task, num: int, *, seed: int, pad_id: int) -> RolloutBatch:
    """`num` train prompts and their demonstrations, collated like a rollout (scores and logprobs 0)."""
    prompts = task.sample_prompts(num, seed=seed)
    responses = [task.demonstration(p) for p in prompts]
    return RolloutBatch.collate(prompts, responses, [[0.0] * len(r) for r in responses], [0.0] * num, pad_id=pad_id)


def warm_start(trainer: PolicyTrainer, task: Task, config: WarmStartConfig, *, rank: int = 0,
               world_size: int = 1) -> dict[str, Any]:
    """`config.num_steps` steps of next-token loss on demonstrations, then the reference := the policy.

    The trainer must be on its device (after `onload()`). Data-parallel workers draw different
    prompts (the seed mixes in the rank) and average gradients, like the RL steps.
    """
    lm = trainer.policy.lm
    params = list(lm.parameters())
    # A separate AdamW: its moments live only in this call, so RL's optimizer starts clean and
    # the offload arena never sees them.
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.num_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        seed = ((config.seed * 1_000_003 + step) * world_size + rank) * 7 + 3  # apart from the RL prompt seeds
        batch = demonstration_batch(task, config.batch_size, seed=seed, pad_id=trainer.pad_id).to(trainer.device)
        logprobs, _, _ = trainer._forward(lm, batch, temperature=1.0)  # [B, R]
        loss = -masked_mean(logprobs, batch.response_mask)  # token-level mean next-token loss
        trainer.step(loss, params, config.max_grad_norm, optimizer)
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    trainer.reset_reference()
    tail = max(1, config.num_steps // 10)
    return {"warm_start_loss_first": losses[0], "warm_start_loss_last": sum(losses[-tail:]) / tail,
            "warm_start_steps_per_second": config.num_steps / (time.perf_counter() - start)}
