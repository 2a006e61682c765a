"""GRPO math: advantages relative to each prompt's group of responses, a token-level clipped loss, k3 KL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from colocate.rl.ppo import check_optimizer_settings, clipped_surrogate, kl_penalty

LossNorm = Literal["token", "sequence"]


@dataclass(kw_only=True)
class GRPOConfig:
    """Hyperparameters of one GRPO run (per worker): `group_size` responses per prompt, no critic.

    >>> GRPOConfig(group_size=8, rollout_batch_size=128, minibatch_size=32, lr=1e-3)   # 16 prompts x 8
    >>> GRPOConfig(group_size=4, scale_by_std=False, kl_coef=0.01)   # Dr. GRPO advantages, k3 KL to the reference
    `rollout_batch_size` counts sequences, so `rollout_batch_size / group_size` prompts are sampled
    per iteration and each prompt's `group_size` responses sit next to each other in the batch.
    `loss_norm="token"` averages the loss over every response token of a minibatch (each token
    weighs the same); "sequence" averages within each response first, then over responses (the
    original GRPO), which gives each token of a long response less weight than one of a short one.
    """

    group_size: int = 8
    scale_by_std: bool = True  # advantage = (r - group mean) / group std; False: r - group mean
    loss_norm: LossNorm = "token"
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0: k3 KL(policy || reference) in the loss; 0: no reference model is kept at all
    ppo_epochs: int = 1
    rollout_batch_size: int = 64
    minibatch_size: int = 16
    lr: float = 1e-5
    # Linear warm-up of the learning rate over the first optimizer steps: a fresh AdamW's first
    # steps move every weight by about lr whatever the gradient's size, which knocks a
    # warm-started model back before RL has any signal.
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no gradient clipping
    tis_cap: float | None = None  # truncated importance weight, as in PPOConfig; None: off

    def __post_init__(self) -> None:
        for name in ("group_size", "ppo_epochs", "rollout_batch_size", "minibatch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2: a group of one response has no baseline "
                             "but itself, so every advantage is 0")
        if self.rollout_batch_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide rollout_batch_size={self.rollout_batch_size} "
                             f"(whole groups per worker); e.g. rollout_batch_size="
                             f"{self.rollout_batch_size - self.rollout_batch_size % self.group_size or self.group_size}")
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} must divide rollout_batch_size="
                             f"{self.rollout_batch_size}, so every minibatch has the same size")
        if self.loss_norm not in ("token", "sequence"):
            raise ValueError(f"loss_norm={self.loss_norm!r} must be 'token' or 'sequence'")
        if not self.clip_eps > 0:  # also rejects NaN
            raise ValueError(f"clip_eps={self.clip_eps!r} must be > 0; 0.2 is usual")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef={self.kl_coef!r} must be >= 0; 0 turns the reference off")
        check_optimizer_settings(self)

    @property
    def num_prompts(self) -> int:
        return self.rollout_batch_size // self.group_size


def group_advantages(scores: torch.Tensor, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Each response's score minus the mean score of its prompt's group, optionally over the group's std.

    `scores` [B] holds B / group_size groups of consecutive responses. The std is the population
    one (divided by group_size), so a scaled group has unit variance. A group whose responses all
    score the same gets advantage 0 for every response: there is nothing to prefer within it,
    and dividing its tiny spread by a tiny std would turn noise into a full-size step.
    """
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}; "
                         "pass [B] scores with B a multiple of group_size, each group's responses consecutive")
    groups = scores.float().view(-1, group_size)  # [G, n]
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=1, unbiased=False, keepdim=True)  # [G, 1]
        centered = torch.where(std > eps, centered / std.clamp_min(eps), torch.zeros_like(centered))
    return centered.flatten()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_eps: float, loss_norm: LossNorm = "token", ref_logprobs: torch.Tensor | None = None,
              kl_coef: float = 0.0, num_tokens: float | None = None, weights: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective on [B, T] response tensors; `advantages` is one number per sequence, [B].

    Per token: the clipped surrogate with the sequence's advantage, plus `kl_coef` times the k3
    estimate of KL(policy || reference) (gradient through `logprobs`). Then normalised by
    `loss_norm`: "token" sums over every token and divides by `num_tokens` (default: the tokens in
    this batch; a data-parallel trainer passes the mean count per worker, so that averaging the
    workers' gradients gives the mean over all their tokens); "sequence" averages each row first. `weights`
    [B, T] (the truncated importance weights) multiply each token's surrogate term, not the KL term.
    stats (detached 0-dim tensors): `clip_fraction`, `approx_kl` (old vs new, k3), `kl_to_reference` (k3).
    """
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} must hold one value per sequence, "
                         f"shape {tuple(logprobs.shape[:1])}")
    mask = mask.to(logprobs.dtype)
    per_token, is_clipped = clipped_surrogate(logprobs, old_logprobs, advantages[:, None], clip_eps=clip_eps)
    if weights is not None:
        per_token = per_token * weights
    kl = None
    if ref_logprobs is not None and kl_coef > 0:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")  # [B, T]
        per_token = per_token + kl_coef * kl
    if loss_norm == "token":
        total = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype)
        loss = (per_token * mask).sum() / total.clamp_min(1)
    elif loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    else:
        raise ValueError(f"loss_norm={loss_norm!r} must be 'token' or 'sequence'")
    with torch.no_grad():
        count = mask.sum().clamp_min(1)
        log_ratio = logprobs - old_logprobs
        stats = {"clip_fraction": (is_clipped.float() * mask).sum() / count,
                 "approx_kl": ((log_ratio.exp() - 1 - log_ratio) * mask).sum() / count}
        if kl is not None:
            stats["kl_to_reference"] = (kl * mask).sum() / count
    return loss, stats
