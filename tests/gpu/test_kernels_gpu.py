"""The fused Triton kernels agree with the torch paths they replace (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from colocate.model import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, d", [(1, 896), (37, 1536), (64, 4096)])
def test_rms_norm(dtype: torch.dtype, n: int, d: int) -> None:
    x = torch.randn(n, d, device="cuda", dtype=dtype)
    res = torch.randn(n, d, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_torch(x, w, 1e-6))
        out, summed = kernels.rms_norm(x, w, 1e-6, res)
        torch.testing.assert_close(summed, x + res, rtol=0, atol=0)
        torch.testing.assert_close(out, kernels.rms_norm_torch(x + res, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq, hkv, d", [(14, 2, 64), (12, 2, 128), (8, 4, 32)])
def test_rotary_on_strided_views(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    n, positions = 19, torch.randint(0, 500, (19,), device="cuda")
    qkv = torch.randn(n, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(n, hq, d), k.view(n, hkv, d)
    angles = torch.arange(512, device="cuda")[:, None] * torch.rand(d // 2, device="cuda")[None]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    with torch.inference_mode():
        got = kernels.rotary(q, k, positions, cos, sin)
    ref = kernels.rotary_torch(q, k, positions, cos, sin)
    for a, b in zip(got, ref):
        # Within one rounding step of the dtype, not bitwise: the compiler fuses multiply-adds
        # that torch rounds separately (outputs are O(1), so 1e-2 is one bfloat16 step).
        torch.testing.assert_close(a, b, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(33, 2 * 4864, device="cuda", dtype=dtype) * 3
    with torch.inference_mode():
        torch.testing.assert_close(kernels.silu_and_mul(x), kernels.silu_and_mul_torch(x))


def test_store_kv_matches_index_copy() -> None:
    from colocate.engine.triton_attention import store_kv

    kv = torch.randn(2, 3, 10, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    ref = kv.clone()
    qkv = torch.randn(7, (8 + 4) * 64, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, 8 * 64: 10 * 64].view(7, 2, 64)
    v = qkv[:, 10 * 64:].view(7, 2, 64)
    slots = torch.tensor([0, 17, 31, 32, 100, 159, 5], device="cuda")
    store_kv(k, v, kv[0, 1], kv[1, 1], slots)
    ref[0, 1].view(-1, 2, 64).index_copy_(0, slots, k)
    ref[1, 1].view(-1, 2, 64).index_copy_(0, slots, v)
    assert torch.equal(kv, ref)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
