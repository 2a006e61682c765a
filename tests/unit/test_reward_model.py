"""RewardModel and TrainerConfig.reward_model: scores from the last token's hidden state, the same streamed or
resident; HF sequence-classification folders load (bad heads refused); a PPO trainer with all four models
(policy, critic, reference, reward model) trains and releases every one of them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from colocate.model import save_preset
from colocate.rl import PPOConfig, RolloutBatch, get_task
from colocate.trainer import PPOTrainer, TrainerConfig
from colocate.trainer.reward_model import RewardModel

CPU = torch.device("cpu")


def batch(pad_id: int = 0) -> RolloutBatch:
    prompts = get_task("repeat_letter").sample_prompts(4, seed=0)
    responses = [[65, 66, 258], [67, 258], [68, 69, 70, 258], [71, 258]]
    return RolloutBatch.collate(prompts, responses, [[0.0] * len(r) for r in responses], [1.0, 0.0, 0.0, 1.0],
                                pad_id=pad_id)


def test_scores_are_the_same_streamed_or_resident_and_read_the_last_token() -> None:
    resident = RewardModel("tiny", device=CPU, dtype=torch.float32, max_positions=64)
    streamed = RewardModel("tiny", device=CPU, dtype=torch.float32, max_positions=64, offload_fraction=0.5)
    b = batch()
    scores = resident.score(b, contextlib.nullcontext)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and scores.unique().numel() == 4
    assert torch.equal(scores, streamed.score(b, contextlib.nullcontext))
    assert streamed.offload.device_bytes() < 0.6 * resident.offload.device_bytes()
    # Padding after the last real token changes nothing: only that token's hidden state is scored.
    prompts = get_task("repeat_letter").sample_prompts(4, seed=0)
    other = RolloutBatch.collate(prompts, [[65, 66, 258]] * 4, [[0.0] * 3] * 4, [0.0] * 4, pad_id=0)
    assert other.input_ids.shape[1] < b.input_ids.shape[1]  # row 0 is the same sequence, padded less
    assert torch.allclose(resident.score(other, contextlib.nullcontext)[0], scores[0], atol=1e-5)


def test_an_hf_sequence_classification_folder_loads_and_bad_heads_are_refused(tmp_path: Path) -> None:
    folder = save_preset("tiny", tmp_path / "rm")
    head = torch.linspace(-1, 1, 256)[None, :]
    save_file({"score.weight": head}, str(folder / "score.safetensors"))
    rm = RewardModel(str(folder), device=CPU, dtype=torch.float32, max_positions=64)
    assert torch.equal(rm.score_head.weight, head)
    (folder / "score.safetensors").unlink()
    with pytest.raises(ValueError, match="has no score.weight"):
        RewardModel(str(folder), device=CPU, dtype=torch.float32, max_positions=64)
    save_file({"score.weight": torch.zeros(2, 256)}, str(folder / "score.safetensors"))
    with pytest.raises(ValueError, match="one label"):
        RewardModel(str(folder), device=CPU, dtype=torch.float32, max_positions=64)


def test_four_models_in_one_ppo_trainer() -> None:
    config = TrainerConfig(model="tiny", max_positions=64, critic_model="tiny", reward_model="tiny",
                           reward_offload=0.5, reference_offload=0.5)
    trainer = PPOTrainer(config, PPOConfig(rollout_batch_size=4, minibatch_size=4, lr=1e-3))
    b = batch(trainer.pad_id)
    want = trainer.reward_model.score(b, contextlib.nullcontext)
    stats = trainer.prepare(b)
    assert torch.equal(b.scores, want)  # the reward model's scores are the rewards
    assert stats["task_score_mean"] == 0.5 and stats["reward_model_score_mean"] == pytest.approx(want.mean().item())
    stats |= trainer.train(b)
    assert stats["grad_norm"] > 0 and stats["critic_grad_norm"] > 0
    trainer.release()
    assert trainer.device_bytes() == 0  # policy, critic, reference and reward model all released
    trainer.resume()
    assert trainer.reward_model.offload.device_bytes() > 0


@pytest.mark.parametrize("value", [2, -1, True, "x"])
def test_bad_reward_offload_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="reward_offload="):
        TrainerConfig(model="tiny", reward_offload=value)
