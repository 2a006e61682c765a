"""PPO math on right-padded [B, T] response tensors: GAE, whitening, clipped losses, KL to the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

KLKind = Literal["k1", "k3"]
AdvantageNorm = Literal["center", "whiten", "none"]


@dataclass(kw_only=True)
class PPOConfig:
    """Hyperparameters of one PPO run (per worker; data-parallel workers each use the same config).

    >>> PPOConfig(lr=1e-3, kl_coef=0.01, rollout_batch_size=128, minibatch_size=32, ppo_epochs=2)  # the tiny example
    >>> PPOConfig(kl_coef=0.0, value_clip_eps=None, ppo_epochs=2)  # no reference penalty, unclipped value loss
    `rollout_batch_size` sequences are generated per iteration on each worker and split into
    minibatches of `minibatch_size` sequences, each one optimizer step, for `ppo_epochs` passes.
    """

    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2  # None: unclipped value loss
    value_coef: float = 0.5  # total loss = policy loss + value_coef * value loss
    kl_coef: float = 0.05  # per-token reward -kl_coef * KL(policy || reference)
    # k1 = log p - log p_ref is negative for a token the policy finds less likely than the reference
    # does: as a reward it pays for sampling it, the more the unlikelier. Once the policy is sure,
    # such tokens are its mistakes. k3 = r - 1 - log r (r = p_ref / p) is never negative and grows
    # as a token gets unlikelier than under the reference, so it charges for them instead; its
    # mean is still the KL. Clamped: one token e^10 times less likely than under the reference
    # must not dominate a whitened batch.
    kl_kind: KLKind = "k3"
    max_kl: float | None = 10.0  # clamp each token's KL estimate to [-max_kl, max_kl]; None: no clamp
    # "whiten": zero mean and unit variance over the batch, so every update has about the same
    # size (steady for Adam, and a plateau's small signal still moves the policy); when nearly
    # every response scores the same it also scales up whatever else is in the advantages (value
    # errors, the KL term). "center": the mean only, in the reward's units. "none": as GAE gives them.
    advantage_norm: AdvantageNorm = "whiten"
    ppo_epochs: int = 4
    rollout_batch_size: int = 64
    minibatch_size: int = 16
    lr: float = 1e-5
    # Linear warm-up of the learning rate over the first optimizer steps: a fresh AdamW's first
    # steps move every weight by about lr whatever the gradient's size, which knocks a
    # warm-started model back before RL has any signal.
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no gradient clipping
    # Truncated importance weight for the engine's sampling distribution (see `importance_weights`):
    # each token's loss times min(p_trainer / p_engine, tis_cap). None: off.
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma!r} must be in [0, 1]; 1.0 is usual for LLM PPO")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam={self.lam!r} must be in [0, 1]; 0.95 is usual")
        if not self.clip_eps > 0:  # also rejects NaN
            raise ValueError(f"clip_eps={self.clip_eps!r} must be > 0; 0.2 is usual")
        if self.value_clip_eps is not None and not self.value_clip_eps > 0:
            raise ValueError(f"value_clip_eps={self.value_clip_eps!r} must be > 0, or None for an unclipped value loss")
        if not self.value_coef >= 0:
            raise ValueError(f"value_coef={self.value_coef!r} must be >= 0; 0 turns the value loss off")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef={self.kl_coef!r} must be >= 0; 0 turns the reference penalty off")
        if self.kl_kind not in _KL:
            raise ValueError(f"kl_kind={self.kl_kind!r} is unknown; choose from {tuple(_KL)}")
        if self.advantage_norm not in ("center", "whiten", "none"):
            raise ValueError(f"advantage_norm={self.advantage_norm!r} must be 'center', 'whiten' or 'none'")
        for name in ("ppo_epochs", "rollout_batch_size", "minibatch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} must divide rollout_batch_size="
                             f"{self.rollout_batch_size}, so every minibatch has the same size; e.g. minibatch_size="
                             f"{_largest_divisor_at_most(self.rollout_batch_size, self.minibatch_size)}")
        check_optimizer_settings(self)

    @property
    def num_minibatches(self) -> int:
        return self.rollout_batch_size // self.minibatch_size


def _largest_divisor_at_most(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (a token-level mean when `dim` is None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under `logits`: [B, T, V], [B, T] -> [B, T], in float32.

    The caller aligns them: logits at position t must be the ones that predicted token_ids[:, t].
    float32 because a bf16 log-softmax keeps only ~3 significant digits, which would show up as a
    logprob gap to the engine that is rounding, not a bug.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's distribution, in nats: [B, T, V] -> [B, T], float32.

    A policy whose entropy falls toward 0 has stopped exploring; one whose entropy climbs
    back after a peak in reward is being pushed away from what it learned.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return -(logp.exp() * logp).sum(-1)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, both [B, T] and 0 at padding.

    `mask` is 1 on response tokens and 0 on right padding. Values at padded positions are
    ignored, and the value after a sequence's last real token is 0 (the episode ends there).
    """
    mask = mask.to(values.dtype)
    values = values.detach() * mask
    rewards = rewards * mask
    num_steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(num_steps)):
        # Padding after the last real token zeroes next_value/next_advantage: bootstrap 0.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    returns = (advantages + values) * mask
    return advantages, returns


def normalize_advantages(advantages: torch.Tensor, mask: torch.Tensor, norm: AdvantageNorm) -> torch.Tensor:
    """Advantages as PPO's loss reads them: centered, whitened or untouched (see PPOConfig.advantage_norm)."""
    if norm == "whiten":
        return whiten(advantages, mask)
    if norm == "center":
        centered = advantages - masked_mean(advantages, mask)
        return torch.where(mask.bool(), centered, torch.zeros_like(centered))
    if norm == "none":
        return advantages
    raise ValueError(f"advantage norm {norm!r} must be 'center', 'whiten' or 'none'")


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale `x` to zero mean and unit variance over masked positions; padding comes back as 0.

    With `shift_mean=False` the mean is kept (only the scale changes). The variance is the
    population one (divided by the token count).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def check_optimizer_settings(config: Any) -> None:
    """The settings PPOConfig and GRPOConfig share: lr, its warm-up, gradient clipping, the importance weight cap."""
    if not config.lr > 0:
        raise ValueError(f"lr={config.lr!r} must be > 0")
    if not isinstance(config.lr_warmup_steps, int) or config.lr_warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps={config.lr_warmup_steps!r} must be an integer >= 0")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={config.max_grad_norm!r} must be > 0, or None for no gradient clipping")
    check_tis_cap(config.tis_cap)


def check_tis_cap(cap: float | None) -> None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 1):
        raise ValueError(f"tis_cap={cap!r} must be a number >= 1 (2 is usual), or None to turn the importance "
                         "weight off")


def importance_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights min(p_trainer / p_engine, cap) per response token, 0 at padding.

    The engine samples from its own distribution (fp8 weights, other kernels, another precision),
    while the loss is the trainer's: weighting each token's loss by p_trainer / p_engine makes the
    gradient the one for samples drawn by the trainer's policy. Truncating at `cap` bounds the
    variance a few tokens the engine found far less likely could add. Detached (a constant of the
    loss). Stats: `tis_weight_mean` and `tis_capped_fraction` (share of tokens at the cap).
    """
    check_tis_cap(cap)
    ratio = torch.exp(trainer_logprobs.detach().float() - engine_logprobs.detach().float())
    valid = mask.bool()
    weights = torch.where(valid, ratio.clamp(max=cap), torch.zeros_like(ratio))
    count = max(int(valid.sum()), 1)
    return weights, {"tis_weight_mean": float(weights.sum()) / count,
                     "tis_capped_fraction": float((valid & (ratio >= cap)).sum()) / count}


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_eps: float, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss, token-level masked mean, and detached stats; `weights` (e.g. the truncated
    importance weights) multiply each token's loss.

    stats: `clip_fraction` (share of tokens where the clipped term was the one used) and
    `approx_kl` (k3 estimate of KL(old || new)). They stay 0-dim tensors, so a training step
    does not wait on the device; call `.item()` when logging.
    """
    per_token, is_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps=clip_eps)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {"clip_fraction": masked_mean(is_clipped.float(), mask),
                 "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask)}
    return loss, stats


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logp - old_logp),
    and where the clipped term was the one used (bool). `advantages` broadcasts against the logprobs."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip_eps: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * masked mean of the larger of the clipped and unclipped squared errors.

    The clipped prediction stays within `clip_eps` of `old_values` (the values at rollout time);
    `clip_eps=None` gives the plain squared error. stats: `value_clip_fraction`, detached.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"value_clip_fraction": torch.zeros((), device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def _kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # Schulman's estimator: unbiased for KL(policy || ref) on policy samples, and never negative.
    return torch.exp(-log_ratio) - 1 + log_ratio


_KL = {"k1": _kl_k1, "k3": _kl_k3}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from logprobs of tokens sampled by the policy.

    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp) (>= 0).
    """
    if kind not in _KL:
        raise ValueError(f"kl kind {kind!r} is unknown; choose from {tuple(_KL)}")
    return _KL[kind](logprobs - ref_logprobs)


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                   kl_coef: float, kl_kind: KLKind = "k1", max_kl: float | None = None) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef * KL on every response token, plus each sequence's
    scalar score ([B]) at its last real token (right padding assumed); 0 at padding.
    `max_kl` clamps each token's KL estimate to [-max_kl, max_kl] first.
    """
    lengths = mask.sum(dim=1).long()  # [B]
    if bool((lengths == 0).any()):
        raise ValueError("every sequence needs at least one response token (a row of `mask` is all 0); "
                         "drop empty responses before shaping rewards")
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, kl_kind).detach()
    if max_kl is not None:
        kl = kl.clamp(-max_kl, max_kl)
    rewards = -kl_coef * kl * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards


def logprob_gap(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the engine's sampling logprobs are from the trainer's recomputed ones, over response tokens.

    Returns plain floats for reports: `logprob_gap_mean_abs`, `logprob_gap_max_abs`, and
    `ratio_mean` (mean of exp(trainer - engine); 1.0 when they agree).
    """
    diff = (trainer_logprobs.detach().float() - engine_logprobs.detach().float())
    valid = mask.bool()
    if not bool(valid.any()):
        return {"logprob_gap_mean_abs": 0.0, "logprob_gap_max_abs": 0.0, "ratio_mean": 1.0}
    diff = diff[valid]
    return {"logprob_gap_mean_abs": diff.abs().mean().item(), "logprob_gap_max_abs": diff.abs().max().item(),
            "ratio_mean": diff.exp().mean().item()}
