"""Correctness checks that run beside the timings: weight fingerprints and greedy tokens of a fixed batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from colocate import Engine, SamplingParams

if TYPE_CHECKING:
    from colocate.server import EngineProcess


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """Exact integer sum of the tensors' bytes read as int32: equal for bitwise-equal weights."""
    total = 0
    for t in tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        raw = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
        total += int(raw.sum(dtype=torch.int64))
    return total


class GreedyCheck:
    """Greedy tokens of one fixed batch of token-id prompts, from any engine (in-process or child).

        greedy = GreedyCheck(vocab_size=151936, num_prompts=8, new_tokens=16, seed=0)
        before = greedy(engine)
        ...  # release and resume, or update the weights
        assert greedy(engine) == before
    """

    def __init__(self, *, vocab_size: int, num_prompts: int, new_tokens: int, seed: int,
                 prompt_len: int = 16) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(0, vocab_size, (num_prompts, prompt_len), generator=gen).tolist()
        self.params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def __call__(self, engine: Engine | EngineProcess) -> list[list[int]]:
        return [o.token_ids for o in engine.generate(self.prompts, self.params)]
