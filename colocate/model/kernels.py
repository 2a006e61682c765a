"""Fused inference kernels for the decoder (RMSNorm with residual add, rotary, SiLU-and-mul): Triton on CUDA, torch elsewhere.

Each Triton kernel rounds to the activation dtype where the torch path does (the compiler may
still fuse a multiply-add), so the two agree to the dtype's precision; the torch path is what runs on CPU and whenever autograd needs a graph
(training), since the Triton kernels have no backward. Decode is launch-bound without these:
the torch RMSNorm alone is seven kernels, rotary fourteen.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(x: torch.Tensor) -> bool:
    """Fused kernels apply on CUDA when no gradient is being recorded through `x`."""
    return x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad) and _triton_available()


# -- torch reference paths (CPU, training) ---------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, scale in the input dtype: the order transformers uses.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                 sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [N, Hq, D], k: [N, Hkv, D], positions: [N], tables: [P, D] float32
    cos = cos_table[positions].to(q.dtype)[:, None, :]
    sin = sin_table[positions].to(q.dtype)[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- dispatch --------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x, or of (x + residual) returning (normed, x + residual) when a residual is given."""
    if use_fused(x) and x.dim() == 2 and x.stride(-1) == 1:
        from colocate.model import _triton_kernels

        return _triton_kernels.rms_norm(x, weight, eps, residual)
    if residual is None:
        return rms_norm_torch(x, weight, eps)
    summed = x + residual
    return rms_norm_torch(summed, weight, eps), summed


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
           sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [N, Hq, D] and k [N, Hkv, D] at `positions`, from float32 [P, D] tables."""
    if use_fused(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        from colocate.model import _triton_kernels

        return _triton_kernels.rotary(q, k, positions, cos_table, sin_table)
    return rotary_torch(q, k, positions, cos_table, sin_table)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    if use_fused(x) and x.dim() == 2 and x.stride(-1) == 1:
        from colocate.model import _triton_kernels

        return _triton_kernels.silu_and_mul(x)
    return silu_and_mul_torch(x)
