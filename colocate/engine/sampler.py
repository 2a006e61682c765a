"""Batched sampling: penalties, greedy, temperature, top-k, top-p, with a per-request random stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    # A 64-bit constant as torch's signed int64 sees it.
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)
# Salts (hex digits of pi) keep the mixes below apart: seed 0 at step 0 is not a fixed point, and
# the two row keys and the derived seeds are different functions of their inputs.
_SALT_SEED_A, _SALT_STEP_A = _i64(0x243F6A8885A308D3), _i64(0x13198A2E03707344)
_SALT_SEED_B, _SALT_ENGINE = _i64(0xA4093822299F31D0), _i64(0x082EFA98EC4E6C89)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    # Logical shift right on int64 (torch's >> is arithmetic).
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of int64 where each input bit flips each output bit half the time."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def derive_seed(engine_seed: int, index: int) -> int:
    """The seed of an engine's index-th unseeded request, in int64's range.

    >>> seed = derive_seed(config.seed, seq_id)  # what the engine uses for a request without a seed

    Distinct indices of one engine seed never share a seed (mix, then a step of an odd constant,
    then a bijection), and a derived seed meets a user's seed (small integers, say) only by chance.
    `engine_seed` and `index` count modulo 2**64.
    """
    key = _mix64(torch.tensor([_i64(engine_seed)]) ^ _SALT_ENGINE)
    return int(_mix64(key + _i64(index * _GOLDEN))[0])


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) numbers [B, V], float32, that depend only on (seed, step, token id).

    A keyed counter-based generator: a request draws the same numbers whether it runs alone or in
    any batch, on any device (int64 ops with wraparound only), and after a preemption; a
    `torch.Generator` per request would cost a kernel launch per row instead. Each row gets two
    64-bit keys, full mixes of its seed and step; the token id then goes through splitmix64's
    finaliser with one key added before it and the other xored between its two rounds. Seeds s and
    s + 1 (or steps t and t + 1) thus give unrelated keys; with one key only, a row would be another
    row's stream shifted by some token count, and the old unmixed seed made that shift exactly 1.
    """
    seeds, steps = seeds.long(), steps.long()
    key_a = _mix64(_mix64(seeds ^ _SALT_SEED_A) ^ _mix64(steps ^ _SALT_STEP_A))  # [B]
    key_b = _mix64(_mix64(seeds ^ _SALT_SEED_B) + steps * _GOLDEN)  # [B]
    x = key_a[:, None] + torch.arange(vocab_size, device=seeds.device, dtype=torch.long)[None, :] * _GOLDEN
    # In place with one scratch tensor: [B, V] is 10M int64 at B=64 on a 152k vocabulary, and a
    # fresh tensor per op made the same arithmetic about 4x slower on CPU (allocation, page faults).
    scratch = torch.empty_like(x)  # [B, V]

    def xorshift(k: int) -> None:
        torch.bitwise_right_shift(x, k, out=scratch)
        x.bitwise_xor_(scratch.bitwise_and_((1 << (64 - k)) - 1))

    xorshift(30)
    x.mul_(_MIX1)
    x.bitwise_xor_(key_b[:, None])
    xorshift(27)
    x.mul_(_MIX2)
    # The top 24 bits of the product: the finaliser's last xorshift (>> 31) never reaches them.
    top = torch.bitwise_right_shift(x, 40, out=scratch).bitwise_and_((1 << 24) - 1)
    return top.float().add_(0.5).mul_(1.0 / (1 << 24))  # 24 bits: exact in float32, never 0 or 1


@dataclass
class Penalties:
    """OpenAI's presence and frequency penalties for the rows that use them (the others pay nothing)."""

    rows: torch.Tensor  # [P] int64: the batch rows with a penalty
    presence: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32
    token_rows: torch.Tensor  # [N] int64: for each token generated so far by those rows, its index in [0, P)
    token_ids: torch.Tensor  # [N] int64: that token


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
    num_top_logprobs: int = 0  # the most alternatives any row asks for (0: none)
    penalties: Penalties | None = None


def sample(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype) -> (token ids [B], logprobs of those tokens [B]), both on device."""
    tokens, logprobs, _ = sample_with_top(logits, st)
    return tokens, logprobs


def sample_with_top(logits: torch.Tensor, st: SamplingTensors,
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`sample`, plus the `st.num_top_logprobs` most likely tokens of each row's distribution:
    (logprobs [B, K], token ids [B, K]), most likely first; None when no row asks."""
    logits = logits.float()
    if st.penalties is not None:
        logits = apply_penalties(logits, st.penalties)
    if st.is_all_greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0], _top(logprobs, st.num_top_logprobs)
    is_greedy = st.temperatures == 0
    scaled = logits / torch.where(is_greedy, 1.0, st.temperatures)[:, None]
    if st.needs_top_k or st.needs_top_p:
        scaled = _filter(scaled, st)
    logprobs = torch.log_softmax(scaled, dim=-1)  # the distribution we sample from
    # Gumbel-max: argmax(logp - log(-log u)) is a sample from softmax(logp).
    gumbel = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, logits.shape[1])))
    sampled = (logprobs + gumbel).argmax(dim=-1)
    tokens = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0], _top(logprobs, st.num_top_logprobs)


def _top(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if k == 0:
        return None
    values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)  # [B, K] each
    return values, ids


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """logits [B, V] float32 -> a copy where each penalised row's token j lost
    presence * (count_j > 0) + frequency * count_j, count_j its occurrences among the generated tokens."""
    counts = torch.zeros(len(p.rows), logits.shape[1], dtype=logits.dtype, device=logits.device)  # [P, V]
    counts.index_put_((p.token_rows, p.token_ids), torch.ones_like(p.token_ids, dtype=logits.dtype),
                      accumulate=True)
    penalty = p.presence[:, None] * (counts > 0) + p.frequency[:, None] * counts  # [P, V]
    return logits.index_add(0, p.rows, -penalty)


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
