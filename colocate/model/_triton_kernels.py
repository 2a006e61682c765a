"""Triton implementations behind colocate.model.kernels (imported on CUDA only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, stride_x, stride_res, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)  # the sum is rounded, as torch's add would
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd).to(dtype).to(tl.float32) * w  # normalise in float32, scale in the activation dtype
    tl.store(out_ptr + row * n_cols + cols, y.to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    res = residual if residual is not None else x
    assert res.stride(-1) == 1, f"{res.stride()=}"
    _rms_norm_kernel[(n,)](x, res, weight, out, res_out, d, x.stride(0), res.stride(0), eps,
                           HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(d), num_warps=4)
    return out if residual is None else (out, res_out)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                   stride_qn, stride_qh, stride_kn, stride_kh, num_q_heads, num_k_heads,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HEAD_DIM + offs).to(dtype).to(tl.float32)  # first half == second half
    s = tl.load(sin_ptr + pos * HEAD_DIM + offs).to(dtype).to(tl.float32)
    if head < num_q_heads:
        src = q_ptr + token * stride_qn + head * stride_qh
        dst = q_out_ptr + (token * num_q_heads + head) * HEAD_DIM
    else:
        src = k_ptr + token * stride_kn + (head - num_q_heads) * stride_kh
        dst = k_out_ptr + (token * num_k_heads + head - num_q_heads) * HEAD_DIM
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HALF + offs).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product and the sum rounded as torch rounds them.
    o1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    tl.store(dst + offs, o1.to(dtype))
    tl.store(dst + HALF + offs, o2.to(dtype))


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
           sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, hq, d = q.shape
    hk = k.shape[1]
    assert d & (d - 1) == 0 and cos_table.is_contiguous(), f"{d=} must be a power of two"
    q_out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((n, hk, d), dtype=k.dtype, device=k.device)
    _rotary_kernel[(n, hq + hk)](q, k, positions, cos_table, sin_table, q_out, k_out, q.stride(0), q.stride(1),
                                 k.stride(0), k.stride(1), hq, hk, HEAD_DIM=d, HALF=d // 2, num_warps=1)
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(n, triton.cdiv(inter, block))](x, out, inter, x.stride(0), BLOCK=block, num_warps=4)
    return out
