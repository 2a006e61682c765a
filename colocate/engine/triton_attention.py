"""Triton paged-KV decode attention: one program per (sequence, KV head, partition), GQA heads together."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Tokens per loop step: 64 rows of K and V (16 KiB each at D=128, bf16) keep enough bytes in
# flight per program without spilling the [BLOCK_H, BLOCK_N] score tile.
BLOCK_N = 64
# Query rows per program are padded to at least 16: the smallest M that tl.dot accepts.
MIN_BLOCK_H = 16
# Split-K aims for this many programs per SM: a decode step is bound by KV reads, and one
# program per SM leaves most of the memory bandwidth idle.
TARGET_PROGRAMS_PER_SM = 4
# Used where no CUDA device can be asked (the Triton interpreter on CPU): an H100 SXM.
DEFAULT_NUM_SMS = 132
# Bounds the [B, Hq, P, D] fp32 scratch buffer and the reduction's loop.
MAX_PARTITIONS = 256
LOG2_E = 1.4426950408889634
# Triton's CPU interpreter multiplies bf16 dot operands as their raw uint16 bits, so there the
# kernel widens them to fp32 first (after the same bf16 rounding of p the GPU path does).
IS_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    stride_pb, stride_ph,
    stride_ab, stride_ah, stride_ap,
    num_partitions,
    GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    # Each sequence's own context is spread evenly over the partitions, in whole tiles, so a short
    # sequence leaves its later partitions empty instead of giving each a sliver; the grid
    # itself depends only on shapes, which keeps the launch graph-capturable.
    part_size = tl.cdiv(tl.cdiv(context_len, num_partitions), BLOCK_N) * BLOCK_N
    part_start = part * part_size
    part_end = tl.minimum(part_start + part_size, context_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    head_mask = offs_h < GROUP_SIZE
    q_heads = kv_head * GROUP_SIZE + offs_h  # the GQA group of this KV head, as SDPA's enable_gqa pairs them
    q = tl.load(q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_mask[:, None], other=0.0)  # [BLOCK_H, D]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # An empty partition keeps these neutral values (max -inf, sum 0): the reduction gives it weight 0.
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_tb
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    for start in range(part_start, part_end, BLOCK_N):
        tok = start + offs_n
        tok_mask = tok < part_end
        # Table entries past the context may hold anything (-1, stale ids): never load through them.
        block = tl.load(table_row + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        kv_mask = tok_mask[:, None]
        k = tl.load(k_head + block[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N], log2 domain
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        # Every tile holds at least one valid token, so m_new is finite and no row becomes NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # V is masked too: cache slots past the context can be uninitialised, and 0 * NaN is NaN.
        v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        p = p.to(v.dtype)  # tensor cores take both operands in the cache dtype
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if IS_SPLIT:
        part_offs = seq * stride_pb + q_heads * stride_ph + part  # [BLOCK_H]
        tl.store(part_max_ptr + part_offs, m_i, mask=head_mask)
        tl.store(part_sum_ptr + part_offs, l_i, mask=head_mask)
        acc_offs = seq * stride_ab + q_heads[:, None] * stride_ah + part * stride_ap + offs_d[None, :]
        tl.store(part_acc_ptr + acc_offs, acc, mask=head_mask[:, None])
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _reduce_partitions_kernel(
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, context_lens_ptr,
    stride_ob, stride_oh,
    stride_pb, stride_ph,
    stride_ab, stride_ah, stride_ap,
    num_partitions,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    # Same split as the first kernel: only partitions that start inside the context hold tokens.
    part_size = tl.cdiv(tl.cdiv(context_len, num_partitions), BLOCK_N) * BLOCK_N
    num_active = tl.cdiv(context_len, part_size)

    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    max_row = part_max_ptr + seq * stride_pb + head * stride_ph
    sum_row = part_sum_ptr + seq * stride_pb + head * stride_ph
    acc_row = part_acc_ptr + seq * stride_ab + head * stride_ah
    for start in range(0, num_active, BLOCK_P):
        parts = start + offs_p
        part_mask = parts < num_active
        part_max = tl.load(max_row + parts, mask=part_mask, other=float("-inf"))  # [BLOCK_P]
        part_sum = tl.load(sum_row + parts, mask=part_mask, other=0.0)
        part_acc = tl.load(acc_row + parts[:, None] * stride_ap + offs_d[None, :],
                           mask=part_mask[:, None], other=0.0)  # [BLOCK_P, D]
        # Partition `start` is active, so m_new is finite and exp2(-inf - m_new) weighs empty ones 0.
        m_new = tl.maximum(m_run, tl.max(part_max, 0))
        alpha = tl.exp2(m_run - m_new)
        weight = tl.exp2(part_max - m_new)
        l_run = l_run * alpha + tl.sum(weight * part_sum, 0)
        acc = acc * alpha + tl.sum(weight[:, None] * part_acc, 0)
        m_run = m_new
    out = acc / l_run
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_partitions(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Partitions per (sequence, KV head): 1 (single pass) once B * Hkv programs fill the GPU.

    Depends only on shapes and the device, never on context lengths, so a captured graph stays valid.
    """
    if device.type == "cuda":
        num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        num_sms = DEFAULT_NUM_SMS
    num_programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(TARGET_PROGRAMS_PER_SM * num_sms, num_programs)
    return max(1, min(wanted, triton.cdiv(max_context_len, BLOCK_N), MAX_PARTITIONS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           *, num_partitions: int | None = None) -> torch.Tensor:
    """Decode attention over a paged KV cache, same contract as `paged_decode_attention_torch`.

    q: [B, Hq, D] (bf16/fp16/fp32); k_cache, v_cache: [num_blocks, block_size, Hkv, D], possibly
    strided views; block_tables: [B, max_blocks] int32; context_lens: [B] int32, each >= 1.
    Returns [B, Hq, D] in q's dtype. `num_partitions` forces the split (1 = single pass);
    by default it follows B * Hkv against the SM count. Graph-capturable: no host sync, and the
    grid depends only on shapes.

        out = paged_decode_attention(q, kv_cache[0, layer], kv_cache[1, layer], tables, lens, d ** -0.5)
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape, f"{k_cache.shape=} {v_cache.shape=}"
    assert k_cache.shape[3] == head_dim, f"{k_cache.shape=} {q.shape=}"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads=} {num_kv_heads=}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"{head_dim=} must be a power of two >= 16"
    assert block_size & (block_size - 1) == 0, f"{block_size=} must be a power of two"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, \
        f"{q.stride()=} {k_cache.stride()=} {v_cache.stride()=}: head_dim must be contiguous"
    assert block_tables.dtype == torch.int32 and context_lens.dtype in (torch.int32, torch.int64), \
        f"{block_tables.dtype=} {context_lens.dtype=}"
    assert k_cache.dtype == q.dtype, f"{k_cache.dtype=} {q.dtype=}"

    group_size = num_q_heads // num_kv_heads
    block_h = max(MIN_BLOCK_H, triton.next_power_of_2(group_size))
    # The longest context the table can describe: a fixed bound, unlike context_lens' values.
    max_context_len = block_tables.shape[1] * block_size
    if num_partitions is None:
        num_partitions = default_num_partitions(num_seqs, num_kv_heads, max_context_len, q.device)
    assert num_partitions >= 1, f"{num_partitions=}"
    is_split = num_partitions > 1
    # fp32 caches ask for fp32 results; tf32 would cost ~1e-3 relative error.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"

    out = torch.empty_like(q)
    if is_split:
        part_max = torch.empty(num_seqs, num_q_heads, num_partitions, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_q_heads, num_partitions, head_dim, dtype=torch.float32, device=q.device)
    else:
        # The single pass never touches the scratch pointers; `out` stands in for them, not a null pointer.
        part_max = part_sum = out
        part_acc = out[..., None]

    _paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_max, part_sum, part_acc,
        scale * LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_max.stride(0), part_max.stride(1),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        num_partitions,
        GROUP_SIZE=group_size, BLOCK_H=block_h, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, IS_SPLIT=is_split, DOT_PRECISION=dot_precision,
        DOT_IN_FP32=IS_INTERPRETER and q.dtype == torch.bfloat16,
        num_warps=4,
    )
    if is_split:
        _reduce_partitions_kernel[(num_seqs, num_q_heads)](
            out, part_max, part_sum, part_acc, context_lens,
            out.stride(0), out.stride(1),
            part_max.stride(0), part_max.stride(1),
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            num_partitions,
            HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, BLOCK_P=min(16, triton.next_power_of_2(num_partitions)),
            num_warps=4,
        )
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_slot, stride_ch, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kn + head * stride_kh + offs)
    v = tl.load(v_ptr + token * stride_vn + head * stride_vh + offs)
    tl.store(k_cache_ptr + slot * stride_slot + head * stride_ch + offs, k)
    tl.store(v_cache_ptr + slot * stride_slot + head * stride_ch + offs, v)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at flat slots [N]: one launch."""
    n, hkv, d = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride() == v_cache.stride(), f"{k.stride()=}"
    # A flat slot s lives at s * stride(1) from the cache's start (blocks are contiguous runs of slots).
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), f"{k_cache.stride()=}"
    _store_kv_kernel[(n, hkv)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), k_cache.stride(1), k_cache.stride(2), HEAD_DIM=d, num_warps=1)
