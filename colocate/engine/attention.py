"""Paged attention: the engine's `AttentionBackend`, writing keys and values into KV cache blocks."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from colocate.engine.kv_cache import KVCachePool


@dataclass
class AttentionMetadata:
    """What one forward pass needs to find its sequences' blocks.

    Prefill: `cu_seqlens` (host list, len B+1) splits the N new tokens by sequence; each
    sequence attends causally to its own new tokens (no prefix reuse, so no cache read).
    Decode: one token per sequence; `block_tables` [B, max_blocks] int32 and
    `context_lens` [B] int32 (tokens in the cache including this one) locate the keys.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [N] int64: flat cache slot (block * block_size + offset) of each new token
    cu_seqlens: list[int] | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    max_context_len: int = 0  # host-side bound for the torch decode path


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 max_context_len: int) -> torch.Tensor:
    """Reference decode attention: gather each sequence's keys, mask past its length, softmax.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
    block_tables: [B, max_blocks] int32; context_lens: [B] int32. Returns [B, Hq, D].
    """
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max_context_len // block_size)
    table = block_tables[:, :num_blocks].long()  # [B, nb]
    k = k_cache[table].reshape(b, num_blocks * block_size, hkv, d)  # [B, T, Hkv, D]
    v = v_cache[table].reshape(b, num_blocks * block_size, hkv, d)
    t = torch.arange(num_blocks * block_size, device=q.device)
    valid = t[None, :] < context_lens[:, None].long()  # [B, T]
    # Slots past a sequence's length can hold anything (the cache is uninitialised after a resume);
    # a masked score still meets its NaN (NaN - inf is NaN), and 0 * NaN is NaN: zero them first.
    k = k.masked_fill(~valid[:, :, None, None], 0)
    v = v.masked_fill(~valid[:, :, None, None], 0)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, Hq, 1, D]
        k.transpose(1, 2), v.transpose(1, 2),  # [B, Hkv, T, D]
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=hq != hkv,
    )
    return out[:, :, 0, :]


class PagedAttention:
    """The model's attention backend during a step: writes new keys into the KV pool, then attends.

    >>> attention = PagedAttention(pool, scale=head_dim ** -0.5, use_triton=True)
    >>> attention.metadata = meta; model(ids, positions, attention)
    """

    def __init__(self, pool: KVCachePool, scale: float, use_triton: bool) -> None:
        self.pool = pool
        self.scale = scale
        self.use_triton = use_triton
        self.metadata: AttentionMetadata | None = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.metadata
        assert meta is not None, "attend outside a step"
        k_cache, v_cache = self.pool.layer(layer_idx)
        hkv, d = k_cache.shape[2], k_cache.shape[3]
        if self.use_triton:
            from colocate.engine.triton_attention import paged_decode_attention, store_kv

            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            if not meta.is_prefill:
                return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        else:
            k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
        if meta.is_prefill:
            return self._prefill(q, k, v, meta.cu_seqlens)
        return paged_decode_attention_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                            self.scale, meta.max_context_len)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        out = torch.empty_like(q)
        gqa = q.shape[1] != k.shape[1]
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=gqa)
            out[start:end] = o[0].transpose(0, 1)
        return out
