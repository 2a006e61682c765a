"""fp8 linear layers: float8_e4m3fn weights with one float32 scale per output channel, quantized as they are written.

Why per output channel (not 128x128 blocks): the Hopper GEMM that takes fp8 with scales in one call,
rowwise `torch._scaled_mm`, wants exactly one scale per output channel of the weight and one per token of
the activation, so the scales apply in the GEMM's epilogue at no extra cost; block scales need a
grouped kernel of our own (scales change along K inside the main loop). Per-row scales also make every
row independent: a fused parameter's shards (q/k/v, gate/up) and any chunk of rows quantize alone to the
same bits as the whole, which is what makes quantize-on-receive exact for any bucket split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
QUANTIZATIONS = ("fp8",)
Fp8Gemm = Literal["dequantize", "scaled_mm"]
FP8_GEMMS: tuple[str, ...] = ("dequantize", "scaled_mm")
# The decoder's linears that are quantized; the embeddings and the LM head stay in the model dtype.
QUANTIZED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# Rows are quantized in chunks of at most this many elements: one chunk's temporaries (the source rows on the
# device, a float32 copy of 64 MiB, the fp8 result) are the constant of the load peak, whatever the largest weight.
MAX_CHUNK_ELEMENTS = 1 << 24


# -- quantization (the one write path) -------------------------------------------------------
def quantize_rows(w: torch.Tensor, *, round_to: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] weight -> ([R, C] float8_e4m3fn, [R] float32 scales) with q[r] * scale[r] ~ w[r].

    `w` is first rounded to `round_to` (the model dtype), so the fp8 weights are a function of the
    weights a model of that dtype would hold, whether the trainer sent float32 or bfloat16.
    A row of zeros gets scale 1; a row holding NaN or infinity gets a non-finite scale (checked after a copy).
    """
    w32 = w.to(round_to).to(torch.float32, copy=True)  # our own copy: divided in place below
    low, high = torch.aminmax(w32, dim=1)  # no |w| temporary; NaN propagates
    amax = torch.maximum(-low, high)  # [R]
    scale = torch.where(amax == 0, 1.0, amax / FP8_MAX)
    # w / scale is within FP8_MAX up to rounding; the clamp keeps a rounded-up 448.00003 in range.
    q = w32.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


@torch.no_grad()
def quantize_into(qweight: torch.Tensor, scale: torch.Tensor, src: torch.Tensor, *, round_to: torch.dtype,
                  max_chunk_elements: int = MAX_CHUNK_ELEMENTS, non_blocking: bool = False,
                  device: torch.device | None = None) -> None:
    """Quantize `src` [R, C] (any device, any float dtype) into `qweight` [R, C] fp8 and `scale` [R], in place.

    Rows move to `device` (default: the destination's) one chunk at a time and are quantized there, so
    the extra device memory is one chunk's temporaries, never the whole bf16 tensor. An engine names
    its own device, so layers it keeps in host memory get the bits its resident layers would (a CPU
    and a GPU may round the fp8 cast differently). The result does not depend on the chunking (each
    row has its own scale). This is the seam for a fused GPU kernel (row amax, scale and cast in one
    launch): it must give the same bits as `quantize_rows`.
    """
    assert qweight.dtype == FP8_DTYPE and scale.dtype == torch.float32, f"{qweight.dtype=} {scale.dtype=}"
    assert src.shape == qweight.shape and scale.shape == qweight.shape[:1], f"{src.shape=} {qweight.shape=}"
    device = qweight.device if device is None else device
    rows = max(1, max_chunk_elements // max(1, src.shape[1]))
    for start in range(0, src.shape[0], rows):
        part = src[start:start + rows].to(device, non_blocking=non_blocking)
        q, s = quantize_rows(part, round_to=round_to)
        qweight[start:start + rows].copy_(q)
        scale[start:start + rows].copy_(s)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, C] fp8 and [R] scales -> [R, C] weight in `dtype` (product in float32, one rounding)."""
    return (qweight.float() * scale[:, None]).to(dtype)


@dataclass(frozen=True)
class Fp8Slice:
    """Where a weight, or one fused shard of it, is written in a quantized linear: its fp8 rows and their scales.

    >>> dst = Fp8Slice(layer.weight[:q_size], layer.weight_scale[:q_size], torch.bfloat16)
    >>> dst.write(q_proj_bf16)          # quantized on the destination's device, in place
    """

    qweight: torch.Tensor  # [R, C] float8_e4m3fn, a view into the parameter
    scale: torch.Tensor  # [R] float32, a view into the scale parameter
    round_to: torch.dtype  # the model dtype
    device: torch.device | None = None  # where to quantize; None: where qweight is

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def finite_probe(self) -> torch.Tensor:
        """What holds NaN or infinity after a write exactly when the source did: the scales."""
        return self.scale

    def write(self, src: torch.Tensor, *, non_blocking: bool = False) -> None:
        quantize_into(self.qweight, self.scale, src, round_to=self.round_to, non_blocking=non_blocking,
                      device=self.device)


# -- the layer -------------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """A linear layer whose weight is float8_e4m3fn [out, in] with a float32 scale per output channel.

    >>> layer = Fp8Linear(1536, 2048, bias=True, dtype=torch.bfloat16)   # built on meta by the loader
    >>> Fp8Slice(layer.weight.data, layer.weight_scale.data, torch.bfloat16).write(w)   # how weights arrive
    >>> y = layer(x)                                                     # x: [N, in] in `dtype`
    The scales are parameters, so a flat parameter buffer holds them beside the fp8 weights and a
    release to the host copies both. Weights are written only through `Fp8Slice` (the loader's path).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 gemm: Fp8Gemm = "dequantize") -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype, self.gemm = in_features, out_features, dtype, gemm
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm == "scaled_mm" and x.is_cuda and _scaled_mm_shapes_ok(self.in_features, self.out_features):
            return scaled_mm_linear(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.dtype}, gemm={self.gemm}"


def quantize_linears(model: nn.Module, *, gemm: Fp8Gemm = "dequantize") -> None:
    """Replace the decoder layers' linears (on meta) by `Fp8Linear`s of the same shape, bias and dtype."""
    for layer in model.model.layers:
        for path in QUANTIZED_LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            assert old.weight.device.type == "meta", f"quantize_linears replaces layers on meta: {old.weight.device=}"
            with torch.device("meta"):
                new = Fp8Linear(old.in_features, old.out_features, bias=old.bias is not None,
                                dtype=old.weight.dtype, gemm=gemm)
            setattr(parent, attr, new)


def fp8_linears(model: nn.Module) -> Iterator[tuple[str, Fp8Linear]]:
    """(name of the weight parameter, its layer) for every `Fp8Linear` of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            yield f"{name}.weight", module


# -- GEMMs -----------------------------------------------------------------------------------
@functools.cache
def can_use_scaled_mm(device: torch.device) -> bool:
    """fp8 tensor-core GEMMs: CUDA devices of compute capability 8.9 (Ada) or later, with torch._scaled_mm."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm_shapes_ok(in_features: int, out_features: int) -> bool:
    # fp8 GEMMs need both dimensions of the weight to be multiples of 16.
    return in_features % 16 == 0 and out_features % 16 == 0


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: [M, K] -> ([M, K] fp8, [M, 1] float32 scales). Separate torch ops for
    now; a fused kernel (in the RMSNorm or SiLU kernel before the GEMM) is what makes fp8 pay off."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX  # padding rows of a graph batch are zeros
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scaled_mm_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16, CUDA) @ fp8 weight [N, K].T with rowwise scales -> [..., N] in x's dtype.

    The GPU seam: rowwise `torch._scaled_mm` (per-token activation scales [M, 1], per-channel weight
    scales [1, N]). Used only when `EngineConfig.fp8_gemm="scaled_mm"` on a device that
    `can_use_scaled_mm`; until it is measured on the GPU the dequantize path stays the default.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, x_scale = quantize_activations(x2)
    # The weight is [N, K] row-major, so its transpose is the column-major [K, N] operand the GEMM wants.
    out = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], qweight.shape[0])
