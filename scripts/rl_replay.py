"""A deterministic replay of the example's RL loop on the letter task: the trainer samples from its own model.

    python scripts/rl_replay.py --seed 0                              # PPO with the defaults (k3, whitened)
    python scripts/rl_replay.py --seed 0 --kl-kind k1                  # the settings whose reward fell back
    python scripts/rl_replay.py --seed 0 --algo grpo

No engine and no Ray: one process, one thread count, so a setting can be compared with another
on the same random draws. Prints one JSON line per iteration with the trainer's statistics and
`advantage_wrong` / `advantage_right`, the mean advantage of response tokens that are not / are
the prompt's letter (a positive `advantage_wrong` in a batch that is nearly all right means the
update pushes toward mistakes), then a summary line.
"""

from __future__ import annotations

import argparse
import json

import torch

from colocate.model import CausalLM, DenseCausalAttention
from colocate.rl import GRPOConfig, PPOConfig, RolloutBatch, get_task
from colocate.trainer import GRPOTrainer, PPOTrainer, TrainerConfig


@torch.no_grad()
def sample(lm: CausalLM, prompts: list[list[int]], num_new: int, gen: torch.Generator,
           ) -> tuple[list[list[int]], list[list[float]]]:
    """`num_new` tokens per prompt at temperature 1, recomputing the whole sequence each step (no cache)."""
    ids = torch.tensor(prompts)  # [B, T]: the letter task's prompts all have the same length
    b = ids.shape[0]
    tokens, logprobs = [], []
    for _ in range(num_new):
        t = ids.shape[1]
        attn = DenseCausalAttention(batch_size=b, seq_len=t)
        hidden = lm(ids.flatten(), torch.arange(t).expand(b, t).flatten(), attn).view(b, t, -1)
        logp = torch.log_softmax(lm.compute_logits(hidden[:, -1]).float(), dim=-1)  # [B, V]
        token = torch.multinomial(logp.exp(), 1, generator=gen)  # [B, 1]
        tokens.append(token)
        logprobs.append(logp.gather(1, token))
        ids = torch.cat([ids, token], dim=1)
    return torch.cat(tokens, 1).tolist(), torch.cat(logprobs, 1).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--kl-kind", default="k3", choices=["k3", "k1"])
    p.add_argument("--advantage-norm", default="whiten", choices=["whiten", "center", "none"])
    args = p.parse_args()
    torch.manual_seed(args.seed)
    task = get_task("repeat_letter")
    trainer_config = TrainerConfig(model="tiny", seed=args.seed, max_positions=64)
    sizes = {"lr": 1e-3, "rollout_batch_size": 128, "minibatch_size": 32, "ppo_epochs": 2}  # the example's defaults
    if args.algo == "ppo":
        trainer = PPOTrainer(trainer_config, PPOConfig(**sizes, kl_coef=0.01, kl_kind=args.kl_kind,
                                                       advantage_norm=args.advantage_norm))
        group_size = 1
    else:
        trainer = GRPOTrainer(trainer_config, GRPOConfig(**sizes, group_size=8))
        group_size = 8
    gen = torch.Generator().manual_seed(args.seed)
    rewards = []
    for iteration in range(args.iterations):
        prompts = [prompt for prompt in task.sample_prompts(128 // group_size, seed=args.seed * 1000 + iteration)
                   for _ in range(group_size)]
        responses, logprobs = sample(trainer.policy.lm, prompts, task.max_new_tokens, gen)
        scores = [task.score(prompt, response) for prompt, response in zip(prompts, responses)]
        batch = RolloutBatch.collate(prompts, responses, logprobs, scores, pad_id=trainer.pad_id)
        stats = trainer.prepare(batch)
        is_wrong = batch.response_ids != torch.tensor([task.target(prompt) for prompt in prompts])[:, None]
        stats["advantage_wrong"] = batch.advantages[is_wrong].mean().item() if is_wrong.any() else None
        stats["advantage_right"] = batch.advantages[~is_wrong].mean().item() if (~is_wrong).any() else None
        stats |= trainer.train(batch)
        rewards.append(sum(scores) / len(scores))
        print(json.dumps({"iteration": iteration, "reward_mean": rewards[-1], **stats}), flush=True)
    near_done = [i for i, r in enumerate(rewards) if r > 0.95]
    print(json.dumps({"summary": vars(args), "reward_last5": sum(rewards[-5:]) / len(rewards[-5:]),
                      "first_at_0.9": next((i for i, r in enumerate(rewards) if r >= 0.9), None),
                      "iterations_over_0.95": len(near_done)}))


if __name__ == "__main__":
    main()
