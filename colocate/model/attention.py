"""How a decoder layer reaches attention: a backend the caller passes in, so the model holds no cache."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    """Stores a layer's new keys and values where it keeps them, then attends.

    q: [N, Hq, D], k and v: [N, Hkv, D] for the N tokens of this forward pass (flattened
    over sequences). Returns [N, Hq, D]. The engine's paged KV cache implements this; so
    does `DenseCausalAttention` for training and reference forwards.
    """

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class DenseCausalAttention:
    """Causal attention over a padded [B, T] batch, no cache (training, reference logits).

    >>> attn = DenseCausalAttention(batch_size=2, seq_len=5, attention_mask=mask)  # mask: [B, T] bool
    >>> hidden = model(input_ids.flatten(), positions.flatten(), attn)
    `attention_mask` marks real tokens (True) against padding (False); None means no padding.
    Padding is expected on the right.
    """

    def __init__(self, *, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None = None) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len
        self.mask: torch.Tensor | None = None
        if attention_mask is not None:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
            # [B, 1, T, T]; a padded query row attends to itself only, so no row is all -inf.
            keep = causal[None] & attention_mask.bool()[:, None, :]
            keep |= torch.eye(seq_len, dtype=torch.bool, device=attention_mask.device)[None]
            self.mask = keep[:, None]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t = self.batch_size, self.seq_len
        q4, k4, v4 = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=self.mask, is_causal=self.mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2).reshape(b * t, q.shape[1], q.shape[2])
