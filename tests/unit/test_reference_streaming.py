"""TrainerConfig.reference_offload: the frozen reference streams part of its layers from host memory and scores
exactly as a resident one, across release/resume and after reset_reference; bad values are refused."""

from __future__ import annotations

import pytest
import torch

from colocate.rl import PPOConfig, RolloutBatch, get_task
from colocate.trainer import PPOTrainer, TrainerConfig


def scored(trainer: PPOTrainer) -> torch.Tensor:
    task = get_task("repeat_letter")
    prompts = task.sample_prompts(8, seed=0)
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, 256, (5,), generator=gen).tolist() for _ in prompts]
    batch = RolloutBatch.collate(prompts, responses, [[0.0] * 5] * 8, [1.0, 0.0] * 4, pad_id=trainer.pad_id)
    trainer.prepare(batch)
    return batch


def test_a_streamed_reference_scores_like_a_resident_one() -> None:
    ppo = PPOConfig(rollout_batch_size=8, minibatch_size=4, lr=1e-3)
    resident = PPOTrainer(TrainerConfig(model="tiny", max_positions=64), ppo)
    streamed = PPOTrainer(TrainerConfig(model="tiny", max_positions=64, reference_offload=0.5), ppo)
    assert resident.reference_streamer is None and streamed.reference_streamer.indices == [1, 2]
    layer = streamed.reference.model.layers[1]
    assert all(p.device.type == "cpu" for p in layer.parameters())
    # The streamed layers are not the reference offload's to move: it holds half the bytes.
    assert streamed.reference_offload.device_bytes() < 0.6 * resident.reference_offload.device_bytes()
    for trainer in (resident, streamed):
        trainer.release()
        trainer.resume()
    a, b = scored(resident), scored(streamed)
    assert torch.equal(a.ref_logprobs, b.ref_logprobs)
    for trainer, batch in ((resident, a), (streamed, b)):  # one step, then the reference becomes the policy
        trainer.train(batch)
        trainer.reset_reference()
    assert torch.equal(scored(resident).ref_logprobs, scored(streamed).ref_logprobs)
    assert not torch.equal(scored(streamed).ref_logprobs, b.ref_logprobs)  # the reset reached streamed layers


@pytest.mark.parametrize("value", [1.5, -0.5, True, "half", float("nan")])
def test_bad_reference_offload_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="reference_offload="):
        TrainerConfig(model="tiny", reference_offload=value)
