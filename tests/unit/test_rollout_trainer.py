"""RolloutBatch collation and the PPO trainer on the tiny preset (CPU, no Ray): alignment, logprobs, offload."""

from __future__ import annotations

import math

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.model import CausalLM, DenseCausalAttention
from colocate.trainer import PPOTrainer, TrainerConfig
from colocate.rl import PPOConfig
from colocate.rl.rollout import RolloutBatch

PAD = 99
# Prompts and responses of different lengths, so neither the longest prompt nor the longest
# response alone sets the padded length (3+2, 1+5, 6+1, 2+3: T = 7 from the third row, R = 5).
PROMPTS = [[10, 11, 12], [20], [30, 31, 32, 33, 34, 35], [40, 41]]
RESPONSES = [[1, 2], [3, 4, 5, 6, 7], [8], [9, 10, 11]]
SCORES = [0.0, 1.0, 0.5, 0.25]
TINY_PPO = PPOConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, kl_coef=0.01)


def engine_logprobs(responses: list[list[int]]) -> list[list[float]]:
    return [[-0.1 * (i + 1) - 0.01 * j for j in range(len(r))] for i, r in enumerate(responses)]


def collate(prompts: list[list[int]] = PROMPTS, responses: list[list[int]] = RESPONSES, pad_id: int = PAD,
            ) -> RolloutBatch:
    return RolloutBatch.collate(prompts, responses, engine_logprobs(responses), SCORES[:len(prompts)], pad_id=pad_id)


def make_trainer(seed: int = 0) -> PPOTrainer:
    return PPOTrainer(TrainerConfig(model="tiny", device="cpu", max_positions=64, seed=seed), TINY_PPO)


def random_batch(seed: int) -> RolloutBatch:
    """Four sequences of byte tokens, response lengths 8, 3, 6, 1, with varied scores."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 2, 7, 3)]
    responses = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (8, 3, 6, 1)]
    scores = torch.rand(4, generator=gen).tolist()
    return RolloutBatch.collate(prompts, responses, engine_logprobs(responses), scores, pad_id=0)


@torch.no_grad()
def logprobs_token_by_token(lm: CausalLM, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response[j] | prompt + response[:j]) from one unpadded forward per token."""
    out = []
    for j, token in enumerate(response):
        ids = torch.tensor(prompt + response[:j])
        hidden = lm(ids, torch.arange(len(ids)), DenseCausalAttention(batch_size=1, seq_len=len(ids)))
        out.append(torch.log_softmax(lm.compute_logits(hidden[-1:]).float(), dim=-1)[0, token].item())
    return out


# -- RolloutBatch ------------------------------------------------------------------------------
def test_collate_pads_right_and_aligns_responses() -> None:
    batch = collate()
    assert len(batch) == 4
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.positions.shape == (4, 7)
    assert batch.response_ids.shape == batch.response_index.shape == batch.response_mask.shape == (4, 5)
    assert batch.engine_logprobs.shape == (4, 5) and batch.scores.shape == (4,)
    assert batch.input_ids.dtype == batch.positions.dtype == batch.response_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.bool
    assert batch.response_mask.dtype == batch.engine_logprobs.dtype == batch.scores.dtype == torch.float32
    assert batch.old_logprobs is None and batch.advantages is None
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(p) + len(r)
        assert batch.input_ids[i].tolist() == p + r + [PAD] * (7 - n)
        assert batch.attention_mask[i].tolist() == [True] * n + [False] * (7 - n)
        assert batch.positions[i].tolist() == list(range(7))
        assert batch.response_ids[i].tolist() == r + [PAD] * (5 - len(r))
        assert batch.response_mask[i].tolist() == [1.0] * len(r) + [0.0] * (5 - len(r))
        assert batch.engine_logprobs[i, :len(r)].tolist() == pytest.approx(engine_logprobs(RESPONSES)[i])
        assert batch.engine_logprobs[i, len(r):].eq(0).all()
    assert batch.scores.tolist() == SCORES


def test_gather_response_picks_the_position_before_each_response_token() -> None:
    batch = collate()
    gathered = batch.gather_response(batch.positions)  # [B, T] of positions -> [B, R]
    assert gathered.shape == (4, 5)
    # every index is a valid position, padding columns included
    assert int(batch.response_index.min()) >= 0 and int(batch.response_index.max()) <= 6
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        assert gathered[i, :len(r)].tolist() == [len(p) - 1 + j for j in range(len(r))]
        # the token one step after each gathered position is the response token it predicts
        assert batch.input_ids[i, gathered[i, :len(r)] + 1].tolist() == r
    # [B, T, D] gathers the same rows for every channel
    x = torch.arange(4 * 7 * 3, dtype=torch.float32).view(4, 7, 3)
    g3 = batch.gather_response(x)
    assert g3.shape == (4, 5, 3)
    for d in range(3):
        assert torch.equal(g3[..., d], batch.gather_response(x[..., d].contiguous()))


def test_select_and_to_index_every_field_the_same_way() -> None:
    batch = collate()
    batch.old_logprobs = torch.arange(20, dtype=torch.float32).view(4, 5)
    sub = batch.select(torch.tensor([2, 0]))
    assert len(sub) == 2
    assert torch.equal(sub.input_ids, batch.input_ids[[2, 0]])
    assert torch.equal(sub.response_index, batch.response_index[[2, 0]])
    assert torch.equal(sub.old_logprobs, batch.old_logprobs[[2, 0]])
    assert sub.scores.tolist() == [SCORES[2], SCORES[0]]
    assert sub.advantages is None and sub.returns is None  # unfilled fields stay None
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.response_ids, batch.response_ids) and moved.ref_logprobs is None


@pytest.mark.parametrize("case", ["fewer_responses", "fewer_logprob_lists", "fewer_scores", "short_logprobs",
                                  "empty_response", "empty_prompt", "empty_batch"])
def test_collate_rejects_inconsistent_inputs(case: str) -> None:
    prompts, responses = [list(p) for p in PROMPTS], [list(r) for r in RESPONSES]
    logprobs, scores = engine_logprobs(responses), list(SCORES)
    if case == "fewer_responses":
        responses = responses[:3]
    elif case == "fewer_logprob_lists":
        logprobs = logprobs[:3]
    elif case == "fewer_scores":
        scores = scores[:3]
    elif case == "short_logprobs":
        logprobs[1] = logprobs[1][:-1]
    elif case == "empty_response":
        responses[2], logprobs[2] = [], []
    elif case == "empty_prompt":
        prompts[0] = []
    else:
        prompts, responses, logprobs, scores = [], [], [], []
    with pytest.raises(ValueError):
        RolloutBatch.collate(prompts, responses, logprobs, scores, pad_id=PAD)


# -- PPOTrainer --------------------------------------------------------------------------------
def test_trainer_config_validates() -> None:
    with pytest.raises(ValueError, match="param_dtype"):
        TrainerConfig(model="tiny", param_dtype="float16")
    with pytest.raises(ValueError, match="device"):
        TrainerConfig(model="tiny", device="meta")
    with pytest.raises(ValueError, match="device='gpu'"):
        TrainerConfig(model="tiny", device="gpu")
    assert TrainerConfig(model="tiny", param_dtype="bfloat16").param_dtype == "bfloat16"


def test_prepare_logprobs_match_the_engine_and_a_token_by_token_forward() -> None:
    trainer = make_trainer(seed=7)  # the engine's preset weights come from seed 0: different until the update
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64))
    lengths = [2, 5, 1, 8]  # cut the samples to different lengths: a prefix keeps its logprobs
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_new_tokens=8, ignore_eos=True) for i in range(4)]

    def rollout() -> RolloutBatch:
        outs = engine.generate(PROMPTS, params)
        assert [len(o.token_ids) for o in outs] == [8] * 4
        return RolloutBatch.collate(PROMPTS, [o.token_ids[:n] for o, n in zip(outs, lengths)],
                                    [o.logprobs[:n] for o, n in zip(outs, lengths)], SCORES, pad_id=trainer.pad_id)

    try:
        stale = trainer.prepare(rollout())
        engine.update_weights(trainer.named_weights(), version=1)
        batch = rollout()
        stats = trainer.prepare(batch)
    finally:
        engine.shutdown()
    assert stale["logprob_gap_max_abs"] > 0.1  # the comparison can fail: other weights give other logprobs
    assert stats["logprob_gap_max_abs"] < 1e-4, stats
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    # The padded batched forward equals one unpadded forward per token, response token j at
    # position len(prompt) - 1 + j.
    for i, prompt in enumerate(PROMPTS):
        response = batch.response_ids[i, :lengths[i]].tolist()
        expected = logprobs_token_by_token(trainer.policy.lm, prompt, response)
        assert batch.old_logprobs[i, :lengths[i]].tolist() == pytest.approx(expected, abs=1e-5)
    # Policy and reference start from the same weights; the value head starts at zero.
    assert torch.equal(batch.old_logprobs, batch.ref_logprobs) and stats["kl_to_reference"] == 0.0
    assert batch.old_values.eq(0).all() and stats["value_mean"] == 0.0
    for name in ("old_logprobs", "old_values", "ref_logprobs", "advantages", "returns"):
        assert getattr(batch, name).shape == batch.response_mask.shape, name
    padding = batch.response_mask == 0
    assert batch.advantages[padding].eq(0).all() and batch.returns[padding].eq(0).all()
    assert batch.advantages[~padding].abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_trainer_scores_the_tempered_distribution_the_engine_sampled(temperature: float) -> None:
    trainer = PPOTrainer(TrainerConfig(model="tiny", max_positions=64), TINY_PPO, temperature=temperature)
    untempered = PPOTrainer(TrainerConfig(model="tiny", max_positions=64), TINY_PPO)
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64))
    try:
        engine.update_weights(trainer.named_weights(), version=1)
        params = [SamplingParams(temperature=temperature, seed=i, max_new_tokens=8, ignore_eos=True) for i in range(4)]
        outs = engine.generate(PROMPTS, params)
    finally:
        engine.shutdown()
    batch = RolloutBatch.collate(PROMPTS, [o.token_ids for o in outs], [o.logprobs for o in outs], SCORES, pad_id=0)
    assert trainer.prepare(batch)["logprob_gap_max_abs"] < 1e-4
    assert untempered.prepare(batch.select(torch.arange(4)))["logprob_gap_max_abs"] > 1e-2  # the check can fail


def test_trainer_refuses_greedy_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        PPOTrainer(TrainerConfig(model="tiny", max_positions=64), TINY_PPO, temperature=0.0)


def test_train_needs_prepare_then_moves_every_weight_with_finite_stats() -> None:
    trainer = make_trainer()
    batch = random_batch(seed=0)
    with pytest.raises(RuntimeError, match="prepare"):
        trainer.train(batch)
    assert trainer.num_steps == 0
    before = {name: t.clone() for name, t in trainer.named_weights()}
    value_before = trainer.policy.value_head.weight.clone()
    trainer.prepare(batch)
    stats = trainer.train(batch)
    assert trainer.num_steps == TINY_PPO.num_minibatches * TINY_PPO.ppo_epochs == 2
    assert {"policy_loss", "value_loss", "grad_norm", "clip_fraction", "approx_kl"} <= stats.keys()
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["grad_norm"] > 0 and stats["value_loss"] > 0
    unchanged = [name for name, t in trainer.named_weights() if torch.equal(t, before[name])]
    assert not unchanged, f"weights the PPO steps did not move: {unchanged}"
    assert not torch.equal(trainer.policy.value_head.weight, value_before)
    # the reference is frozen
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    odd = random_batch(seed=1).select(torch.arange(3))  # 3 sequences do not split into minibatches of 2
    trainer.prepare(odd)
    with pytest.raises(ValueError, match="minibatch"):
        trainer.train(odd)


def resident_bytes(trainer: PPOTrainer) -> int:
    """Bytes of every tensor the trainer keeps: policy and reference weights, gradients, AdamW state."""
    policy = list(trainer.policy.parameters())
    tensors = [*policy, *trainer.reference.parameters(), *(p.grad for p in policy if p.grad is not None)]
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_offload_onload_between_steps_is_bitwise_neutral_and_frees_the_device_state() -> None:
    plain, cycled = make_trainer(), make_trainer()
    policy_bytes = sum(p.numel() * p.element_size() for p in cycled.policy.parameters())
    reference_bytes = sum(p.numel() * p.element_size() for p in cycled.reference.parameters())
    resident = cycled.device_bytes()
    assert resident == resident_bytes(cycled) == policy_bytes + reference_bytes  # no gradients or moments yet
    cycled.release()
    assert cycled.device_bytes() == 0
    cycled.resume()
    assert cycled.device_bytes() == resident
    for step in range(2):
        for trainer in (plain, cycled):
            batch = random_batch(seed=step)
            trainer.prepare(batch)
            trainer.train(batch)
        assert cycled.device_bytes() == resident_bytes(cycled) >= resident + 2 * policy_bytes  # + AdamW moments
        cycled.release()
        assert cycled.device_bytes() == 0
        assert cycled.policy_offload.device_bytes() == cycled.reference_offload.device_bytes() == 0
        cycled.resume()
        # everything kept comes back (gradients may be dropped: each step makes them anew)
        assert cycled.device_bytes() == resident_bytes(cycled) >= resident + 2 * policy_bytes
    weights = list(zip(plain.named_weights(), cycled.named_weights()))
    assert weights and all(a_name == b_name for (a_name, _), (b_name, _) in weights)
    differing = [name for (name, a), (_, b) in weights if not torch.equal(a, b)]
    assert not differing, f"offload/onload changed the training of {differing}"
    assert torch.equal(plain.policy.value_head.weight, cycled.policy.value_head.weight)
    assert plain.num_steps == cycled.num_steps == 4


def test_truncated_importance_weights_enter_the_trainer_loss() -> None:
    """With tis_cap, prepare weighs each token by min(p_trainer / p_engine, cap) and training follows it."""
    config = TrainerConfig(model="tiny", device="cpu", max_positions=64, seed=0)
    capped = PPOTrainer(config, PPOConfig(**{**TINY_PPO.__dict__, "tis_cap": 2.0}))
    plain = PPOTrainer(config, TINY_PPO)
    batch, same = random_batch(seed=0), random_batch(seed=0)
    stats = capped.prepare(batch)
    plain.prepare(same)
    assert same.is_weights is None
    expected = torch.exp(batch.old_logprobs - batch.engine_logprobs).clamp(max=2.0) * batch.response_mask
    assert torch.allclose(batch.is_weights, expected)
    # The made-up engine logprobs (-0.1 to -0.5) are far likelier than the random model's: every weight is small.
    assert 0 < stats["tis_weight_mean"] < 0.1 and stats["tis_capped_fraction"] == 0.0
    capped.train(batch)
    plain.train(same)
    moved = [name for (name, a), (_, b) in zip(capped.named_weights(), plain.named_weights()) if not torch.equal(a, b)]
    assert moved, "the importance weights changed no update"
