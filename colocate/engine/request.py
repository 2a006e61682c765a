"""Turning generate()'s arguments into validated sequences, before anything is queued."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq

from colocate.engine.config import SamplingParams
from colocate.engine.sampler import derive_seed
from colocate.engine.sequence import Sequence
from colocate.model import Tokenizer

Prompt = str | list[int]


def normalize_requests(prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None,
                       ) -> tuple[list[Prompt], list[SamplingParams]]:
    """One prompt or a list of them, and one SamplingParams or one per prompt -> two equal lists."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a list of token ids, or a list of either; "
                         f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate() got no prompts; pass a string, a list of token ids, or a list of either")
    if params is None:
        params = SamplingParams()
    param_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(param_list) != len(prompts):
        raise ValueError(f"got {len(param_list)} SamplingParams for {len(prompts)} prompts; pass one or one each")
    if not all(isinstance(p, SamplingParams) for p in param_list):
        raise ValueError("params must be SamplingParams or a list of them")
    return prompts, param_list


def tokenize_prompt(index: int, prompt: Prompt, *, tokenizer: Tokenizer | None, vocab_size: int,
                    max_model_len: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text but the model has no tokenizer.json; pass token ids instead")
        tokens = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = list(prompt)
    else:
        raise ValueError(f"prompt {index} must be a string or a list of int token ids, got {type(prompt).__name__}")
    if not tokens:
        raise ValueError(f"prompt {index} is empty; give at least one token")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
    if len(tokens) >= max_model_len:
        raise ValueError(f"prompt {index} has {len(tokens)} tokens, but max_model_len={max_model_len} "
                         "leaves no room to generate; shorten the prompt or raise max_model_len")
    return tokens


class SequenceFactory:
    """Makes the engine's sequences: every prompt validated first (a bad one makes none), ids and seeds given.

    >>> seqs = factory.make(["Hello", [1, 2, 3]], SamplingParams(seed=7))
    A request without a seed gets one mixed from the engine's seed and its id (independent of every other).
    `SamplingParams.n` > 1 gives n sequences per prompt, prompt-major: the first leads, the others are its
    siblings (they share its prompt's KV blocks once it is prefilled).
    """

    def __init__(self, *, tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int, seed: int) -> None:
        self.tokenizer, self.vocab_size, self.max_model_len, self.seed = tokenizer, vocab_size, max_model_len, seed
        self._ids = itertools.count()

    def make(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None, *,
             on_finish: Callable[[Sequence], None] | None = None,
             on_update: Callable[[Sequence], None] | None = None) -> list[Sequence]:
        prompts, param_list = normalize_requests(prompts, params)
        token_lists = [tokenize_prompt(i, p, tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                                       max_model_len=self.max_model_len) for i, p in enumerate(prompts)]
        seqs = []
        for tokens, sp in zip(token_lists, param_list):
            group = []
            for i in range(sp.n):
                seq_id = next(self._ids)
                # Response i of seed s is the request of seed s + i (wrapped into 64 bits).
                seed = _wrap64(sp.seed + i) if sp.seed is not None else derive_seed(self.seed, seq_id)
                group.append(Sequence(seq_id, tokens, sp, seed))
                group[-1].on_finish, group[-1].on_update = on_finish, on_update
            group[0].siblings = group[1:]
            for sibling in group[1:]:
                sibling.leader = group[0]
            seqs.extend(group)
        return seqs


def _wrap64(x: int) -> int:
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)
