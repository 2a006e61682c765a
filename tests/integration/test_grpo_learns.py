"""GRPO on the tiny preset with the real engine (in process, CPU): the reward rises on the letter task from
random weights, and on 1-digit sums after a short supervised warm start. Bounded: well under a minute each."""

from __future__ import annotations

import time
from typing import Any

import pytest

from colocate import Engine, EngineConfig, SamplingParams
from colocate.rl import GRPOConfig, RolloutBatch, Task, get_task
from colocate.trainer import GRPOTrainer, TrainerConfig
from colocate.trainer.sft import WarmStartConfig, warm_start


def sampled_accuracy(engine: Engine, task: Task, prompts: list[list[int]], *, num_samples: int) -> float:
    """Mean score of `num_samples` responses (temperature 1, fixed seeds) to each prompt: the same draws
    before and after training, so the difference is the policy's and not the sampling noise's."""
    prompts = [p for p in prompts for _ in range(num_samples)]
    params = [SamplingParams(max_new_tokens=task.max_new_tokens, temperature=1.0, seed=10**6 + i,
                             ignore_eos=task.ignore_eos) for i in range(len(prompts))]
    outputs = engine.generate(prompts, params)
    return sum(task.score(p, o.token_ids) for p, o in zip(prompts, outputs)) / len(prompts)


def run_grpo(task: Task, *, iterations: int, seed: int, grpo: GRPOConfig, warm_start_steps: int = 0,
             probe: list[list[int]] | None = None) -> dict[str, Any]:
    """GRPO iterations with the engine sampling and the trainer updating it after each; the mean reward of
    each iteration's rollout, the probe prompts' sampled accuracy before and after, and the seconds taken."""
    start = time.perf_counter()
    trainer = GRPOTrainer(TrainerConfig(model="tiny", max_positions=64, seed=seed), grpo)
    if warm_start_steps:
        warm_start(trainer, task, WarmStartConfig(num_steps=warm_start_steps, batch_size=32, lr=3e-3, seed=seed))
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, max_num_seqs=256))
    rewards: list[float] = []
    result: dict[str, Any] = {}
    try:
        engine.update_weights(trainer.named_weights(), version=0)
        if probe:
            result["probe_before"] = sampled_accuracy(engine, task, probe, num_samples=8)
        for iteration in range(iterations):
            base = (seed * 1000 + iteration) * grpo.rollout_batch_size
            prompts = [p for p in task.sample_prompts(grpo.num_prompts, seed=seed * 1000 + iteration)
                       for _ in range(grpo.group_size)]
            params = [SamplingParams(max_new_tokens=task.max_new_tokens, temperature=1.0, seed=base + i,
                                     ignore_eos=task.ignore_eos) for i in range(len(prompts))]
            outputs = engine.generate(prompts, params)
            scores = [task.score(p, o.token_ids) for p, o in zip(prompts, outputs)]
            rewards.append(sum(scores) / len(scores))
            batch = RolloutBatch.collate(prompts, [o.token_ids for o in outputs], [o.logprobs for o in outputs],
                                         scores, pad_id=trainer.pad_id)
            stats = trainer.prepare(batch)
            assert stats["logprob_gap_max_abs"] < 1e-3, stats  # the engine sampled from the trainer's weights
            trainer.train(batch)
            engine.update_weights(trainer.named_weights(), version=iteration + 1)
        if probe:
            result["probe_after"] = sampled_accuracy(engine, task, probe, num_samples=8)
    finally:
        engine.shutdown()
    return result | {"rewards": rewards, "seconds": time.perf_counter() - start}


@pytest.mark.timeout(300)  # a hang fails here; the run itself takes ~20-40 s on two free cores
def test_grpo_learns_the_letter_task_from_random_weights() -> None:
    task = get_task("repeat_letter")
    grpo = GRPOConfig(group_size=8, rollout_batch_size=128, minibatch_size=32, ppo_epochs=2, lr=1e-3)
    run = run_grpo(task, iterations=12, seed=0, grpo=grpo)
    rewards = run["rewards"]
    print(f"rewards {' '.join(f'{r:.3f}' for r in rewards)} in {run['seconds']:.0f} s")
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    # A random model hits the letter about once in 320 tokens. Measured on 2 CPU cores (first two
    # iterations -> last two): seed 0 0.003 -> 0.396, seed 1 0.003 -> 0.187, seed 2 0.006 -> 0.258.
    # The margin is half the smallest rise (0.184), so it holds with room for run-to-run noise.
    assert first < 0.05, rewards
    assert last - first >= 0.09, rewards


@pytest.mark.timeout(300)
def test_grpo_lifts_one_digit_sums_after_a_short_warm_start() -> None:
    task = get_task("arithmetic", max_digits=1, ops="+", eval_fraction=0.2)
    probe = sorted({tuple(p) for p in task.sample_prompts(2000, seed=0)})  # every train problem, 78 of them
    grpo = GRPOConfig(group_size=8, rollout_batch_size=256, minibatch_size=128, ppo_epochs=2, lr=3e-4,
                      lr_warmup_steps=8)
    run = run_grpo(task, iterations=16, seed=0, grpo=grpo, warm_start_steps=150, probe=[list(p) for p in probe])
    print(f"probe {run['probe_before']:.3f} -> {run['probe_after']:.3f}; rewards "
          f"{' '.join(f'{r:.3f}' for r in run['rewards'])} in {run['seconds']:.0f} s")
    # The warm start leaves a model that is sometimes right; GRPO makes it right more often on the same
    # prompts and the same sampling seeds (8 samples of each of the 78 train problems). Measured on 2 CPU
    # cores: seed 0 0.704 -> 0.793, seed 1 0.481 -> 0.585, seed 2 0.793 -> 0.873. The margin is half the
    # smallest gain (0.080); a higher lr (5e-4) made it worse (0.704 -> 0.647), a lower one barely moved it.
    assert 0.2 < run["probe_before"] < 0.95, run
    assert run["probe_after"] - run["probe_before"] >= 0.04, run
