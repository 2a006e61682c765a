"""Logprobs beyond the sampled token's: each step's top alternatives, and the scores of prompt tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from colocate.engine.sequence import Sequence, StepOutput, TopLogprobs

# Prompt positions scored per forward of the LM head: [chunk, V] float32 logits at a time (a 152k
# vocabulary makes that 600 MB at 1024 positions), however long the prompt.
PROMPT_CHUNK = 1024


def step_output(seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor,
                top: tuple[torch.Tensor, torch.Tensor] | None,
                prompt: dict[int, tuple[list[float | None], list[TopLogprobs]]]) -> StepOutput:
    """The sampler's device tensors as host lists, with one device-to-host transfer (one sync)."""
    rows = [tokens.double(), logprobs.double()]  # token ids are exact in float64
    if top is not None:
        rows += [*top[0].double().T, *top[1].double().T]  # K rows of values, then K rows of ids
    host = torch.stack(rows).cpu().tolist()  # [2 + 2K, B]
    num_top = 0 if top is None else top[0].shape[1]
    tops: list[TopLogprobs | None] = []
    for i, seq in enumerate(seqs):
        k = seq.params.top_logprobs
        # Tokens the row cannot sample (-inf after top-k / top-p) are not alternatives.
        tops.append([(int(host[2 + num_top + j][i]), host[2 + j][i]) for j in range(min(k, num_top))
                     if host[2 + j][i] > -math.inf] if k else None)
    return StepOutput(token_ids=[int(t) for t in host[0]], logprobs=host[1], top_logprobs=tops,
                      prompt_logprobs=prompt)


def wants_prompt_logprobs(seq: Sequence) -> bool:
    # A preempted sequence is prefilled again: its prompt was scored the first time.
    return seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None


def score_prompts(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  seqs: list[Sequence], cu_seqlens: list[int],
                  ) -> dict[int, tuple[list[float | None], list[TopLogprobs]]]:
    """For each prefilled sequence that asks: the logprob of each prompt token given the ones before
    it under the plain softmax (None for the first) and its `prompt_logprobs` top alternatives.

    `hidden` [T, H] is the prefill's last hidden state over the flattened batch; position p of a
    sequence predicts its token p + 1.
    """
    scores = {}
    for i, seq in enumerate(seqs):
        if not wants_prompt_logprobs(seq):
            continue
        k, n, start = seq.params.prompt_logprobs, seq.num_prompt_tokens, cu_seqlens[i]
        targets = torch.tensor(seq.token_ids[1:n], dtype=torch.long, device=hidden.device)  # [n - 1]
        chosen: list[float | None] = [None]
        tops: list[TopLogprobs] = [[]]
        for a in range(0, n - 1, PROMPT_CHUNK):
            b = min(a + PROMPT_CHUNK, n - 1)
            logprobs = torch.log_softmax(compute_logits(hidden[start + a:start + b]).float(), dim=-1)  # [b - a, V]
            rows = [logprobs.gather(1, targets[a:b, None])[:, 0].double()]
            if k:
                values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
                rows += [*values.double().T, *ids.double().T]
            host = torch.stack(rows).cpu().tolist()
            chosen.extend(host[0])
            kk = (len(host) - 1) // 2
            tops.extend([[(int(host[1 + kk + j][r]), host[1 + j][r]) for j in range(kk) if host[1 + j][r] > -math.inf]
                         for r in range(b - a)])
        scores[i] = (chosen, tops)
    return scores
