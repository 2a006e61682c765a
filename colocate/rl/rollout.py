"""A rollout batch: prompts and sampled responses, padded into the tensors a PPO step reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """Sequences of one worker's rollout, right-padded.

    >>> batch = RolloutBatch.collate(prompts, responses, engine_logprobs, scores, pad_id=258)
    >>> hidden = model(batch.input_ids.flatten(), batch.positions.flatten(), attention)  # [B*T, H]
    >>> per_token = batch.gather_response(full)   # [B, T] aligned to the full sequence -> [B, R]
    `input_ids` [B, T] holds prompt + response; `attention_mask` marks real tokens. The response
    tensors are [B, R] (R = longest response): row i, column j is response token j of sequence i,
    predicted by the model output at `response_index[i, j]` (the position just before it).
    """

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T] int64
    response_ids: torch.Tensor  # [B, R] int64, pad_id past each response
    response_index: torch.Tensor  # [B, R] int64: where in [B, T] the prediction of each response token is
    response_mask: torch.Tensor  # [B, R] float32: 1 on response tokens
    engine_logprobs: torch.Tensor  # [B, R] float32: the engine's sampling logprobs
    scores: torch.Tensor  # [B] float32
    # Filled by the trainer before its PPO epochs, all [B, R] float32:
    old_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None  # truncated importance weights (PPOConfig.tis_cap), else None

    @classmethod
    def collate(cls, prompts: list[list[int]], responses: list[list[int]], engine_logprobs: list[list[float]],
                scores: list[float], *, pad_id: int, device: torch.device | str = "cpu") -> RolloutBatch:
        n = len(prompts)
        if not n or not len(responses) == len(engine_logprobs) == len(scores) == n:
            raise ValueError(f"collate needs one response, one logprob list and one score per prompt; got "
                             f"{n} prompts, {len(responses)} responses, {len(engine_logprobs)} logprob lists and "
                             f"{len(scores)} scores")
        for i, (p, r, lp) in enumerate(zip(prompts, responses, engine_logprobs)):
            if not p or not r or len(r) != len(lp):
                raise ValueError(f"sequence {i}: needs a non-empty prompt and response and one logprob per response "
                                 f"token (prompt {len(p)}, response {len(r)}, logprobs {len(lp)} tokens)")
        seq_len = max(len(p) + len(r) for p, r in zip(prompts, responses))
        resp_len = max(len(r) for r in responses)
        input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(n, seq_len, dtype=torch.bool)
        response_ids = torch.full((n, resp_len), pad_id, dtype=torch.long)
        response_index = torch.zeros(n, resp_len, dtype=torch.long)
        response_mask = torch.zeros(n, resp_len)
        logprobs = torch.zeros(n, resp_len)
        for i, (p, r, lp) in enumerate(zip(prompts, responses, engine_logprobs)):
            total = len(p) + len(r)
            input_ids[i, :total] = torch.tensor(p + r)
            attention_mask[i, :total] = True
            response_ids[i, :len(r)] = torch.tensor(r)
            # Token p+j is predicted by the output at p+j-1; padding columns point at a valid position.
            response_index[i] = (len(p) - 1 + torch.arange(resp_len)).clamp_max(seq_len - 1)
            response_mask[i, :len(r)] = 1.0
            logprobs[i, :len(r)] = torch.tensor(lp, dtype=torch.float32)
        positions = torch.arange(seq_len).expand(n, seq_len).contiguous()
        return cls(input_ids.to(device), attention_mask.to(device), positions.to(device), response_ids.to(device),
                   response_index.to(device), response_mask.to(device), logprobs.to(device),
                   torch.tensor(scores, dtype=torch.float32, device=device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def gather_response(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] or [B, T, D] values at every position -> the ones that predict response tokens, [B, R(, D)]."""
        index = self.response_index
        if x.dim() == 3:
            index = index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.gather(1, index)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The sub-batch of `rows` (a minibatch); every field indexed the same way."""
        return self._map(lambda t: t[rows])

    def to(self, device: torch.device | str) -> RolloutBatch:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RolloutBatch:
        return RolloutBatch(**{f: None if getattr(self, f) is None else fn(getattr(self, f))
                               for f in self.__dataclass_fields__})
