"""PPO math against hand-computed cases and a loop reference; tasks; a tiny policy that learns with them."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from colocate.rl import (TASKS, GRPOConfig, PPOConfig, RepeatLetterTask, compute_gae, get_task, grpo_loss,
                         importance_weights, kl_penalty, logprob_gap, masked_mean, normalize_advantages, policy_loss, shaped_rewards, token_logprobs, value_loss,
                         whiten)


def _padded_batch(lengths: list[int], num_steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(lengths), num_steps, generator=gen, dtype=torch.float64)
    values = torch.randn(len(lengths), num_steps, generator=gen, dtype=torch.float64)
    mask = torch.zeros(len(lengths), num_steps, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return rewards, values, mask


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """One unpadded sequence, the textbook way: the value after the last token is 0."""
    n = len(rewards)
    advantages = [0.0] * n
    gae = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        gae = delta + gamma * lam * gae
        advantages[t] = gae
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_loop_reference_with_padding(gamma: float, lam: float) -> None:
    lengths = [7, 3, 1, 5]
    rewards, values, mask = _padded_batch(lengths, 7, seed=0)
    # Garbage at padded positions must change nothing.
    rewards_noisy = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values_noisy = torch.where(mask.bool(), values, torch.full_like(values, -1e6))
    advantages, returns = compute_gae(rewards_noisy, values_noisy, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        ref_adv, ref_ret = _gae_reference(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(ref_adv, dtype=torch.float64))
        torch.testing.assert_close(returns[b, :n], torch.tensor(ref_ret, dtype=torch.float64))
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_gae_gamma_lam_one_gives_reward_to_go() -> None:
    rewards, values, mask = _padded_batch([6, 2, 4], 6, seed=1)
    rewards = rewards * mask
    _, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, reward_to_go)


def test_whiten_gives_zero_mean_unit_variance_over_mask() -> None:
    gen = torch.Generator().manual_seed(2)
    x = 3 + 5 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    _, _, mask = _padded_batch([9, 4, 6, 1], 9, seed=2)
    w = whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-12
    assert abs(masked_mean(w**2, mask).item() - 1) < 1e-6
    assert w[mask == 0].abs().sum() == 0
    kept = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(kept, mask), masked_mean(x, mask))
    on = mask.bool()
    torch.testing.assert_close(kept[on], w[on] + masked_mean(x, mask))  # same scale, mean kept


def test_policy_loss_by_hand() -> None:
    clip_eps = 0.2
    # ratios 1.1 (inside), 1.5 (above, A>0: clipped), 0.5 (below, A<0: clipped), 0.5 (below, A>0: not clipped),
    # 1.5 (above, A<0: not clipped: the pessimistic term is the unclipped one), and one padded token.
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 9.0]], dtype=torch.float64)
    advantages = torch.tensor([[2.0, 1.0, -1.0, 3.0, -2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    old = torch.log(torch.tensor([[0.3, 0.2, 0.4, 0.1, 0.25, 0.05]], dtype=torch.float64))
    new = old + torch.log(ratios)
    loss, stats = policy_loss(new, old, advantages, mask, clip_eps=clip_eps)
    per_token = [-2.0 * 1.1, -1.0 * 1.2, 1.0 * 0.8, -3.0 * 0.5, 2.0 * 1.5]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    expected_kl = sum(r - 1 - math.log(r) for r in [1.1, 1.5, 0.5, 0.5, 1.5]) / 5
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)


def test_policy_loss_inside_clip_range_is_minus_advantage_weighted_ratio_with_its_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    old = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    new = (old + 0.05 * torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    loss, stats = policy_loss(new, old, advantages, mask, clip_eps=0.2)
    expected = -(advantages * torch.exp(new - old)).mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clip_fraction"].item() == 0
    (grad,) = torch.autograd.grad(loss, new)
    torch.testing.assert_close(grad, -(advantages * torch.exp(new - old)).detach() / 15)


def test_value_loss_clipping_by_hand() -> None:
    old_values = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.1, 1.0, 1.0, 9.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # token 0: within the clip, error 0.9^2; token 1: clipped to 0.2, error 0.8^2 beats 0^2;
    # token 2: no change from old, error 1; token 3 is padding.
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 1.0) / 3)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)
    plain, _ = value_loss(values, old_values, returns, mask, clip_eps=None)
    assert plain.item() == pytest.approx(0.5 * (0.81 + 0.0 + 1.0) / 3)


def test_kl_penalty_by_hand_and_k3_non_negative() -> None:
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([math.log(2), math.log(0.5)]))
    # k3 = r - 1 - log r with r = ref / p
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.5 - 1 + math.log(2), 2 - 1 - math.log(2)]))
    gen = torch.Generator().manual_seed(4)
    a, b = 3 * torch.randn(1000, generator=gen), 3 * torch.randn(1000, generator=gen)
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert (kl_penalty(a, a, "k3") == 0).all() and (kl_penalty(a, a, "k1") == 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(a, b, "k2")  # type: ignore[arg-type]


def test_shaped_rewards_put_score_at_last_real_token() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.9, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.5], [0.4, 0.9, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = shaped_rewards(torch.tensor([1.0, 0.5]), logp, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.1 * math.log(2), 0.0, 1.0], [-0.1 * math.log(0.5) + 0.5, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="at least one response token"):
        shaped_rewards(torch.tensor([1.0, 0.5]), logp, ref, torch.tensor([[1, 1, 1], [0, 0, 0]]), kl_coef=0.1)


def test_k3_charges_for_the_unlikely_tokens_k1_pays_for() -> None:
    # A sure policy (0.99 on the right token) and a uniform reference over 320 tokens; the wrong
    # token it samples now and then has probability 1e-4. Regression: with k1 in the reward the
    # mistake earned 0.092 more than the right token, and whitening an all-right batch made that
    # a full-size step toward mistakes (the default example fell from 0.996 to 0.68).
    logp = torch.log(torch.tensor([[0.99, 1e-4]]))
    ref = torch.full((1, 2), math.log(1 / 320))
    mask = torch.tensor([[1, 1]])
    k1 = shaped_rewards(torch.zeros(1), logp, ref, mask, kl_coef=0.01, kl_kind="k1")
    assert k1[0, 1] - k1[0, 0] == pytest.approx(0.01 * (math.log(0.99) - math.log(1e-4)))  # +0.092 for the mistake
    k3 = shaped_rewards(torch.zeros(1), logp, ref, mask, kl_coef=0.01, kl_kind="k3", max_kl=10.0)
    r_right, r_wrong = (1 / 320) / 0.99, (1 / 320) / 1e-4  # 0.0032 and 31.25
    assert k3[0, 0].item() == pytest.approx(-0.01 * (r_right - 1 - math.log(r_right)))  # -0.048
    assert -0.01 * (r_wrong - 1 - math.log(r_wrong)) < -0.1  # 26.8 nats unclamped ...
    assert k3[0, 1].item() == pytest.approx(-0.1)  # ... clamped to 10
    assert k3[0, 1] < k3[0, 0]
    assert PPOConfig().kl_kind == "k3" and PPOConfig().max_kl == 10.0


def test_normalize_advantages_modes() -> None:
    adv = torch.tensor([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(normalize_advantages(adv, mask, "center"), torch.tensor([[-1.0, 1.0, 0], [0, 0, 0]]))
    torch.testing.assert_close(normalize_advantages(adv, mask, "whiten"),
                               torch.tensor([[-1.0, 1.0, 0], [0, 0, 0]]) * math.sqrt(1.5), rtol=0, atol=1e-6)
    assert normalize_advantages(adv, mask, "none") is adv
    with pytest.raises(ValueError, match="advantage_norm"):
        PPOConfig(advantage_norm="scale")  # type: ignore[arg-type]


def test_token_logprobs_and_logprob_gap() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 4), generator=gen)
    logp = token_logprobs(logits.bfloat16(), ids)
    assert logp.dtype == torch.float32 and (logp <= 0).all()
    exact = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(logp, exact)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    shifted = logp.clone()
    shifted[0, 1] += 0.3
    shifted[0, 3] += 50.0  # padding: ignored
    gap = logprob_gap(logp, shifted, mask)
    assert gap["logprob_gap_max_abs"] == pytest.approx(0.3, abs=1e-6)
    assert gap["logprob_gap_mean_abs"] == pytest.approx(0.3 / 5, abs=1e-6)
    assert gap["ratio_mean"] == pytest.approx((4 + math.exp(0.3)) / 5, abs=1e-6)


def test_truncated_importance_weights_by_hand() -> None:
    # trainer / engine probability ratios 0.5, 1, 1.5, 3 (capped at 2), and a padded token.
    engine = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.3]]))
    trainer = engine + torch.log(torch.tensor([[0.5, 1.0, 1.5, 3.0, 7.0]]))
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    weights, stats = importance_weights(trainer, engine, mask, cap=2.0)
    assert weights.tolist()[0] == pytest.approx([0.5, 1.0, 1.5, 2.0, 0.0], abs=1e-6)
    assert not weights.requires_grad
    assert stats["tis_weight_mean"] == pytest.approx(5.0 / 4, abs=1e-6)
    assert stats["tis_capped_fraction"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="tis_cap"):
        importance_weights(trainer, engine, mask, cap=0.9)


def test_importance_weights_multiply_each_tokens_loss() -> None:
    """PPO and GRPO losses with weights are the weighted per-token terms, and their gradients scale the same way."""
    old = torch.log(torch.tensor([[0.3, 0.2, 0.4]], dtype=torch.float64))
    new = (old + torch.log(torch.tensor([[1.1, 0.95, 1.05]], dtype=torch.float64))).requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.float64)
    weights = torch.tensor([[0.5, 2.0, 1.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    loss, _ = policy_loss(new, old, advantages, mask, clip_eps=0.2, weights=weights)
    assert loss.item() == pytest.approx((-1.0 * 1.1 * 0.5 + 2.0 * 0.95 * 2.0 - 0.5 * 1.05 * 1.0) / 3)
    (grad,) = torch.autograd.grad(loss, new)
    # d/dlogp of -A r w is -A r w (r = exp(logp - old)), divided by the 3 tokens.
    assert grad.tolist()[0] == pytest.approx([-1.0 * 1.1 * 0.5 / 3, 2.0 * 0.95 * 2.0 / 3, -0.5 * 1.05 / 3])
    g_loss, _ = grpo_loss(new, old, torch.tensor([1.0], dtype=torch.float64), mask, clip_eps=0.2, weights=weights)
    assert g_loss.item() == pytest.approx((-1.1 * 0.5 - 0.95 * 2.0 - 1.05 * 1.0) / 3)
    with pytest.raises(ValueError, match="tis_cap"):
        GRPOConfig(tis_cap=0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=1.5), "gamma"), (dict(lam=-0.1), "lam"), (dict(clip_eps=0.0), "clip_eps"),
    (dict(clip_eps=float("nan")), "clip_eps"), (dict(value_clip_eps=-1.0), "None"), (dict(kl_coef=-0.1), "kl_coef"),
    (dict(kl_kind="k2"), "k3"), (dict(ppo_epochs=0), "ppo_epochs"), (dict(minibatch_size=2.5), "integer"),
    (dict(rollout_batch_size=64, minibatch_size=24), "minibatch_size=16"), (dict(lr=0.0), "lr"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(value_coef=-1.0), "value_coef"),
    (dict(tis_cap=0.5), "tis_cap"), (dict(tis_cap=float("nan")), "tis_cap"), (dict(tis_cap="2"), "tis_cap"),
])
def test_ppo_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


def test_ppo_config_is_keyword_only_and_defaults_are_valid() -> None:
    config = PPOConfig(value_clip_eps=None, max_grad_norm=None)
    assert config.num_minibatches == config.rollout_batch_size // config.minibatch_size
    with pytest.raises(TypeError):
        PPOConfig(1.0)  # type: ignore[misc]


def test_tasks_scores_prompts_and_registry() -> None:
    task = get_task("repeat_letter")
    assert task.sample_prompts(16, seed=7) == task.sample_prompts(16, seed=7)
    assert task.sample_prompts(16, seed=7) != task.sample_prompts(16, seed=8)
    for prompt in task.sample_prompts(16, seed=7):
        assert bytes(prompt) in (b"say a: ", b"say b: ")
        target = prompt[4]
        assert task.score(prompt, [target] * task.max_new_tokens) == 1.0
        assert task.score(prompt, [target] * (task.max_new_tokens + 5)) == 1.0  # only the first K count
        wrong = ord("a") if target == ord("b") else ord("b")
        assert task.score(prompt, [wrong] * task.max_new_tokens) == 0.0
        assert task.score(prompt, []) == 0.0
        assert task.score(prompt, [target, 257]) == pytest.approx(1 / task.max_new_tokens)  # early EOS: misses
    gen = torch.Generator().manual_seed(6)
    az = get_task("repeat_letter_az", max_new_tokens=4)
    assert az.max_new_tokens == 4 and az.name == "repeat_letter_az"
    assert {bytes(p)[4:5] for p in az.sample_prompts(500, seed=0)} == {bytes([c]) for c in range(97, 123)}
    for prompt in az.sample_prompts(50, seed=1):
        score = az.score(prompt, torch.randint(0, 320, (6,), generator=gen).tolist())
        assert 0.0 <= score <= 1.0
    assert set(TASKS) == {"repeat_letter", "repeat_letter_az", "arithmetic"}
    with pytest.raises(ValueError, match="repeat_letter"):
        get_task("nope")
    with pytest.raises(ValueError, match="sample_prompts"):
        task.score(list(b"say z: "), [122])
    with pytest.raises(ValueError, match="letters"):
        RepeatLetterTask(letters="a1")


# ---- end to end: a tiny policy learns the task with these functions ---------------------------------------

VOCAB, EOS = 320, 257


class _TinyPolicy(torch.nn.Module):
    """A causal bag-of-embeddings policy with a value head, torch only.

    Position t sees the prompt (its byte embeddings, concatenated) and the sum of the embeddings
    of response tokens before t; so the value head can count hits so far, which gives GAE real
    per-token credit. The output layer starts at zero: the first policy is uniform over 320 tokens.
    """

    def __init__(self, *, prompt_len: int, num_positions: int, hidden: int = 64, embed: int = 16) -> None:
        super().__init__()
        self.num_positions = num_positions
        self.embed = torch.nn.Embedding(VOCAB, embed)
        self.position = torch.nn.Parameter(torch.randn(num_positions, hidden))
        self.from_prompt = torch.nn.Linear(prompt_len * embed, hidden)
        self.from_prefix = torch.nn.Linear(embed, hidden, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        self.logits = torch.nn.Linear(hidden, VOCAB)
        self.value = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.logits.weight)
        torch.nn.init.zeros_(self.logits.bias)

    def forward(self, prompts: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(tokens)  # [B, K, E]
        prefix = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1].cumsum(1)], dim=1)  # tokens before t, [B, K, E]
        h = self.from_prompt(self.embed(prompts).flatten(1))[:, None] + self.from_prefix(prefix) + self.position
        h = self.mlp(h)  # [B, K, H]
        return self.logits(h), self.value(h).squeeze(-1)  # [B, K, V], [B, K]

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.zeros(prompts.shape[0], self.num_positions, dtype=torch.long)
        for t in range(self.num_positions):
            logits, _ = self(prompts, tokens)  # position t ignores tokens[:, t:], still 0
            tokens[:, t] = torch.multinomial(logits[:, t].softmax(-1), 1, generator=gen)[:, 0]
        # A response ends at its first EOS (itself a real token): right padding after it.
        is_eos = (tokens == EOS).long()
        mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # [B, K]
        return tokens, mask


def test_tiny_policy_learns_repeat_letter_with_ppo() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    task = get_task("repeat_letter", max_new_tokens=8)
    config = PPOConfig(lr=5e-3, clip_eps=0.3, kl_coef=0.01, rollout_batch_size=64, minibatch_size=16, ppo_epochs=4)
    policy = _TinyPolicy(prompt_len=7, num_positions=task.max_new_tokens)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    reward_means = []
    for iteration in range(30):
        prompt_ids = task.sample_prompts(config.rollout_batch_size, seed=iteration)
        prompts = torch.tensor(prompt_ids)
        tokens, mask = policy.generate(prompts, gen)
        scores = torch.tensor([task.score(p, t[:int(m.sum())]) for p, t, m in zip(prompt_ids, tokens.tolist(), mask)])
        reward_means.append(scores.mean().item())
        with torch.no_grad():
            logits, old_values = policy(prompts, tokens)
            old_logprobs = token_logprobs(logits, tokens)
            ref_logprobs = token_logprobs(reference(prompts, tokens)[0], tokens)
        rewards = shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=config.kl_coef,
                                 kl_kind=config.kl_kind, max_kl=config.max_kl)
        advantages, returns = compute_gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
        advantages = normalize_advantages(advantages, mask, config.advantage_norm)
        for _ in range(config.ppo_epochs):
            for rows in torch.randperm(config.rollout_batch_size, generator=gen).split(config.minibatch_size):
                logits, values = policy(prompts[rows], tokens[rows])
                pg_loss, _ = policy_loss(token_logprobs(logits, tokens[rows]), old_logprobs[rows], advantages[rows],
                                         mask[rows], clip_eps=config.clip_eps)
                vf_loss, _ = value_loss(values, old_values[rows], returns[rows], mask[rows],
                                        clip_eps=config.value_clip_eps)
                optimizer.zero_grad()
                (pg_loss + config.value_coef * vf_loss).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
    first, last = reward_means[0], sum(reward_means[-3:]) / 3
    # No time assertion: ~2 s alone on 2 cores, but CPU shared with other test runs made it 10x slower.
    print(f"reward {first:.3f} -> {last:.3f} in {time.perf_counter() - start:.1f} s")
    assert first < 0.05, reward_means  # a uniform policy scores ~1/320
    assert last - first >= 0.3, reward_means
