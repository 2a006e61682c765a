"""GRPO math against hand-computed values: group advantages, token- vs sequence-level loss, the k3 KL term."""

from __future__ import annotations

import math

import pytest
import torch

from colocate.rl import GRPOConfig, group_advantages, grpo_loss, kl_penalty

SQRT2 = math.sqrt(2)


def test_group_advantages_by_hand() -> None:
    # Three groups of four: two right and two wrong; all right; a half-and-half of 0 and 0.5.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    centered = group_advantages(scores, 4, scale_by_std=False)
    torch.testing.assert_close(centered, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, 0.25, 0.25]))
    # Population std: 0.5 and 0.25 -> every scaled advantage is +-1; the all-equal group stays 0, not 0/0.
    scaled = group_advantages(scores, 4)
    torch.testing.assert_close(scaled, torch.tensor([1.0, -1, -1, 1, 0, 0, 0, 0, -1, -1, 1, 1]))
    # One right in three: mean 1/3, population std sqrt(2)/3 -> (-1/sqrt(2), -1/sqrt(2), sqrt(2)).
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 0.0, 1.0]), 3),
                               torch.tensor([-1 / SQRT2, -1 / SQRT2, SQRT2]))
    # Groups are consecutive rows: the same scores grouped in twos give other baselines.
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale_by_std=False),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_advantages_rejects_scores_that_are_not_whole_groups() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.zeros(2, 2), 2)


def _two_sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths 1 and 3 (right padded to 3); logprobs equal to the old ones, so every ratio is 1."""
    logprobs = torch.full((2, 3), math.log(0.5), requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    return logprobs, mask


def test_token_level_loss_weighs_every_token_the_same() -> None:
    logprobs, mask = _two_sequences()
    advantages = torch.tensor([1.0, -1.0])
    # Per-token loss -A * ratio: -1 on the short sequence's token, +1 on each of the long one's three.
    loss, stats = grpo_loss(logprobs, logprobs.detach(), advantages, mask, clip_eps=0.2, loss_norm="token")
    assert loss.item() == pytest.approx((-1 + 3 * 1) / 4)  # 0.5: the sum over 4 tokens, divided by 4
    loss.backward()
    # d loss / d logprob = -A * ratio / 4 on every real token, 0 on padding.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, 0, 0], [0.25, 0.25, 0.25]]))
    assert stats["clip_fraction"].item() == 0 and stats["approx_kl"].item() == pytest.approx(0, abs=1e-7)


def test_sequence_level_loss_weighs_every_sequence_the_same() -> None:
    logprobs, mask = _two_sequences()
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logprobs, logprobs.detach(), advantages, mask, clip_eps=0.2, loss_norm="sequence")
    assert loss.item() == pytest.approx(((-1 / 1) + (3 / 3)) / 2)  # 0: each sequence's mean, then the mean
    loss.backward()
    # The short sequence's one token gets three times the weight of each token of the long one.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))


def test_token_level_loss_divides_by_the_given_token_count() -> None:
    # A data-parallel trainer passes the mean token count over workers instead of its own.
    logprobs, mask = _two_sequences()
    loss, _ = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), mask, clip_eps=0.2, num_tokens=8.0)
    assert loss.item() == pytest.approx(2 / 8)


def test_grpo_loss_clips_the_ratio_like_ppo() -> None:
    old = torch.zeros(2, 1)
    logprobs = torch.full((2, 1), 0.5, requires_grad=True)  # ratio e^0.5 = 1.6487, outside 1 +- 0.2
    mask = torch.ones(2, 1)
    loss, stats = grpo_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, clip_eps=0.2)
    # A = +1: max(-1.6487, -1.2) = -1.2 (clipped, no gradient); A = -1: max(1.6487, 1.2) = 1.6487 (unclipped).
    assert loss.item() == pytest.approx((-1.2 + math.exp(0.5)) / 2)
    assert stats["clip_fraction"].item() == 0.5
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0], [math.exp(0.5) / 2]]))


def test_k3_kl_by_hand_in_the_estimator_and_in_the_loss() -> None:
    # Policy 0.5 vs reference 0.25: 0.25/0.5 - 1 - log(0.5) = log 2 - 0.5; policy 0.25 vs 0.5: 2 - 1 - log 2.
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    expected = torch.tensor([[math.log(2) - 0.5, 1 - math.log(2)]])
    torch.testing.assert_close(kl_penalty(logprobs.detach(), ref, "k3"), expected)
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(logprobs, logprobs.detach(), torch.zeros(1), mask, clip_eps=0.2, ref_logprobs=ref,
                            kl_coef=0.1)
    # A = 0: the loss is the KL term alone, 0.1 * the token mean of k3.
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5 + 1 - math.log(2)) / 2)
    assert stats["kl_to_reference"].item() == pytest.approx(0.25)
    loss.backward()
    # d k3 / d logp = 1 - p_ref / p: 1 - 0.5 and 1 - 2; times 0.1 / 2 tokens.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.05 * 0.5, 0.05 * -1.0]]))
    # kl_coef 0 or no reference: no KL term, no reference statistic.
    loss0, stats0 = grpo_loss(logprobs, logprobs.detach(), torch.zeros(1), mask, clip_eps=0.2, ref_logprobs=ref)
    assert loss0.item() == 0 and "kl_to_reference" not in stats0


def test_grpo_loss_rejects_per_token_advantages() -> None:
    logprobs, mask = _two_sequences()
    with pytest.raises(ValueError, match="one value per sequence"):
        grpo_loss(logprobs, logprobs, torch.zeros(2, 3), mask, clip_eps=0.2)


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size": 1}, "group_size=1 must be >= 2"),
    ({"group_size": 3, "rollout_batch_size": 8}, "must divide rollout_batch_size=8"),
    ({"rollout_batch_size": 64, "minibatch_size": 24}, "minibatch_size=24"),
    ({"loss_norm": "batch"}, "loss_norm"),
    ({"clip_eps": 0.0}, "clip_eps"),
    ({"kl_coef": -0.1}, "kl_coef"),
    ({"lr": 0}, "lr"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
])
def test_grpo_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


def test_grpo_config_defaults_and_prompt_count() -> None:
    config = GRPOConfig(group_size=8, rollout_batch_size=128, minibatch_size=32)
    assert config.num_prompts == 16 and config.loss_norm == "token" and config.scale_by_std
    with pytest.raises(TypeError):
        GRPOConfig(8)  # type: ignore[misc]
