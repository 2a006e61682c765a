"""Batched sampling: greedy, temperature, top-k, top-p, with a per-request random stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    # A 64-bit constant as torch's signed int64 sees it.
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    # Logical shift right on int64 (torch's >> is arithmetic).
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) numbers [B, V] that depend only on (seed, step, token id).

    A counter-based generator (splitmix64 over the triple): a request draws the same numbers
    whether it runs alone or in any batch, on any device, and after a preemption; a
    `torch.Generator` per request would cost a kernel launch per row instead.
    """
    base = seeds.long() * _GOLDEN + steps.long() * _MIX2  # [B]
    x = base[:, None] + torch.arange(vocab_size, device=seeds.device, dtype=torch.long)[None, :] * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, never 0 or 1


@dataclass
class SamplingTensors:
    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the token being sampled within its request
    is_all_greedy: bool
    needs_top_k: bool
    needs_top_p: bool


def sample(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype) -> (token ids [B], logprobs of those tokens [B]), both on device."""
    logits = logits.float()
    if st.is_all_greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    is_greedy = st.temperatures == 0
    scaled = logits / torch.where(is_greedy, 1.0, st.temperatures)[:, None]
    if st.needs_top_k or st.needs_top_p:
        scaled = _filter(scaled, st)
    logprobs = torch.log_softmax(scaled, dim=-1)  # the distribution we sample from
    # Gumbel-max: argmax(logp - log(-log u)) is a sample from softmax(logp).
    gumbel = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, logits.shape[1])))
    sampled = (logprobs + gumbel).argmax(dim=-1)
    tokens = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _filter(scaled: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (greedy rows are untouched)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    vocab = scaled.shape[1]
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if st.needs_top_k:
        k = torch.where(st.top_k > 0, st.top_k, vocab)
        drop |= ranks >= k[:, None]
    if st.needs_top_p:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= st.top_p[:, None]
    drop &= (st.temperatures > 0)[:, None]
    drop[:, 0] = False  # the most likely token always stays
    mask = torch.zeros_like(drop).scatter_(1, order, drop)
    return scaled.masked_fill(mask, float("-inf"))
