"""Sampler facts: top-k/top-p keep exactly their set, logprobs are of the sampled distribution, noise is uniform."""

from __future__ import annotations

import math

import pytest
import torch

from colocate.engine.sampler import SamplingTensors, sample, uniform_noise


def _tensors(b: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             step0: int = 0) -> SamplingTensors:
    return SamplingTensors(
        temperatures=torch.full((b,), temperature), top_k=torch.full((b,), top_k, dtype=torch.long),
        top_p=torch.full((b,), top_p), seeds=torch.full((b,), seed, dtype=torch.long),
        steps=torch.arange(step0, step0 + b, dtype=torch.long), is_all_greedy=temperature == 0,
        needs_top_k=top_k > 0, needs_top_p=top_p < 1)


def test_uniform_noise_is_uniform_and_deterministic() -> None:
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 100_000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    again = uniform_noise(torch.tensor([2]), torch.tensor([0]), 100_000)
    assert torch.equal(u[1], again[0])  # row depends only on its own seed and step
    assert not torch.equal(u[0], u[1])


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (8, 0.5)])
def test_top_k_top_p_never_leave_the_kept_set(top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    probs = torch.softmax(logits[0], dim=-1)
    order = probs.argsort(descending=True)
    kept = order[:top_k] if top_k else order
    sorted_p = probs[kept]
    mass_before = sorted_p.cumsum(0) - sorted_p
    kept = kept[mass_before < top_p]
    n = 4000
    tokens, logprobs = sample(logits.expand(n, -1), _tensors(n, top_k=top_k, top_p=top_p))
    assert set(tokens.tolist()) <= set(kept.tolist())
    assert len(set(tokens.tolist())) == len(kept)  # every kept token shows up in 4000 draws
    renorm = torch.log(probs[kept] / probs[kept].sum())
    expected = dict(zip(kept.tolist(), renorm.tolist()))
    assert logprobs.tolist() == pytest.approx([expected[t] for t in tokens.tolist()], abs=1e-5)


def test_sampling_frequencies_follow_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75) at T=1
    n = 20_000
    tokens, _ = sample(logits.expand(n, -1), _tensors(n, temperature=1.0, seed=3))
    assert abs(tokens.float().mean().item() - 0.75) < 0.015
    tokens, _ = sample(logits.expand(n, -1), _tensors(n, temperature=0.5, seed=3))
    assert abs(tokens.float().mean().item() - 0.9) < 0.01  # (0.25^2, 0.75^2) renormalised


def test_greedy_rows_mixed_with_sampled_rows() -> None:
    logits = torch.randn(4, 30)
    st = _tensors(4, temperature=1.0, top_k=3)
    st.temperatures[1] = 0.0
    st.is_all_greedy = False
    tokens, logprobs = sample(logits, st)
    assert tokens[1] == logits[1].argmax()
    assert logprobs[1] == pytest.approx(torch.log_softmax(logits[1], -1)[tokens[1]].item(), abs=1e-6)
