"""Triton paged decode attention against the torch reference: GQA, split-K, masking, CUDA graphs."""

from __future__ import annotations

import importlib.util
import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, that is when the kernel module is first
# imported: settle the mode here, before anything imports triton, and import the kernel lazily.
IS_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

import pytest  # noqa: E402
import torch  # noqa: E402

from colocate.engine.attention import paged_decode_attention_torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_TRITON:
    SKIP_REASON = "triton is not installed"
elif not HAS_CUDA and not IS_INTERPRETER:
    SKIP_REASON = "needs CUDA, or TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
else:
    SKIP_REASON = None
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# (num_seqs, num_q_heads, num_kv_heads, head_dim, dtype, num_partitions, block_size, max_blocks).
# num_partitions 1 is the single pass, None the default choice (split-K for these small batches);
# short contexts against several partitions leave some partitions empty on purpose.
CASES = [
    (1, 4, 4, 32, torch.float32, 1, 16, 8),
    (1, 4, 4, 32, torch.float32, None, 16, 8),
    (3, 4, 2, 64, torch.float32, 1, 16, 8),
    (3, 4, 2, 64, torch.float32, 3, 16, 8),
    (3, 14, 2, 128, torch.float32, 1, 16, 8),
    (3, 14, 2, 128, torch.float32, 5, 16, 8),
    (8, 14, 2, 64, torch.bfloat16, 1, 16, 8),
    (8, 14, 2, 64, torch.bfloat16, 4, 16, 8),
    (1, 14, 2, 128, torch.bfloat16, None, 16, 24),  # several tiles per partition
    (3, 8, 8, 32, torch.bfloat16, 2, 16, 8),
    (3, 16, 2, 64, torch.bfloat16, 1, 32, 4),  # group of 8, block_size 32
    (3, 16, 2, 64, torch.float16, 3, 32, 4),
    (2, 4, 2, 32, torch.bfloat16, None, 16, 80),  # 20 busy partitions
]


def make_inputs(num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                block_size: int, max_blocks: int, *, seed: int = 0, is_max_last: bool = False) -> dict:
    """A paged cache with shuffled blocks; every slot that holds no valid token is NaN for the kernel.

    `is_max_last` aims sequence 0's last key at its queries, so the top score lies in the last partition.
    """
    gen = torch.Generator().manual_seed(seed)
    max_context_len = max_blocks * block_size
    context_lens = torch.randint(1, max_context_len + 1, (num_seqs,), generator=gen)
    context_lens[0] = max_context_len - 3  # the last block partly filled
    if num_seqs > 1:
        context_lens[-1] = 1
    num_blocks = num_seqs * max_blocks + 5
    block_tables = torch.randperm(num_blocks, generator=gen)[:num_seqs * max_blocks].view(num_seqs, max_blocks)
    num_used_blocks = (context_lens + block_size - 1) // block_size
    # Entries past a sequence's blocks are junk the kernel must never follow.
    block_tables[torch.arange(max_blocks)[None, :] >= num_used_blocks[:, None]] = -1

    num_layers = 2
    kv_cache = torch.randn(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    is_valid = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for seq in range(num_seqs):
        for tok in range(int(context_lens[seq])):
            is_valid[block_tables[seq, tok // block_size], tok % block_size] = True
    q = torch.randn(num_seqs, num_q_heads, head_dim, generator=gen)
    if is_max_last:
        last = int(context_lens[0]) - 1
        group = q[0].view(num_kv_heads, num_q_heads // num_kv_heads, head_dim).sum(1)  # [Hkv, D]
        kv_cache[0, :, block_tables[0, last // block_size], last % block_size] = 2 * group
    kv_cache = kv_cache.to(dtype)
    q = q.to(dtype)
    clean_cache = kv_cache.clone()
    kv_cache[:, :, ~is_valid] = float("nan")
    return {
        "q": q.to(DEVICE),
        "kv_cache": kv_cache.to(DEVICE),  # [2, L, num_blocks, block_size, Hkv, D]
        "clean_cache": clean_cache.to(DEVICE),
        "block_tables": block_tables.to(torch.int32).to(DEVICE),
        "context_lens": context_lens.to(torch.int32).to(DEVICE),
        "scale": head_dim ** -0.5,
    }


def reference(inputs: dict, layer: int) -> torch.Tensor:
    """fp32 torch attention on the same (already rounded) inputs, NaN slots zeroed since it masks them anyway."""
    cache = inputs["clean_cache"].float()
    lens = inputs["context_lens"]
    return paged_decode_attention_torch(inputs["q"].float(), cache[0, layer], cache[1, layer], inputs["block_tables"],
                                        lens, inputs["scale"], int(lens.max()))


def check_case(num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               num_partitions: int | None, block_size: int, max_blocks: int, *, is_max_last: bool = False) -> None:
    from colocate.engine.triton_attention import paged_decode_attention

    inputs = make_inputs(num_seqs, num_q_heads, num_kv_heads, head_dim, dtype, block_size, max_blocks,
                         is_max_last=is_max_last)
    layer = 1  # strided views into the middle of the one cache tensor, as the engine passes them
    kv_cache = inputs["kv_cache"]
    out = paged_decode_attention(inputs["q"], kv_cache[0, layer], kv_cache[1, layer], inputs["block_tables"],
                                 inputs["context_lens"], inputs["scale"], num_partitions=num_partitions)
    assert out.shape == inputs["q"].shape and out.dtype == dtype, f"{out.shape=} {out.dtype=}"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), reference(inputs, layer), atol=tol, rtol=tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-{}-P{}-bs{}-nb{}".format(
    *c[:4], str(c[4]).removeprefix("torch."), *c[5:]))
def test_matches_torch_reference(case: tuple) -> None:
    check_case(*case)


def test_reduction_rescales_when_the_max_comes_last() -> None:
    # 20 busy partitions are two chunks of 16 for the reduction; the top score in the second one
    # means the first chunk's sum must be rescaled.
    check_case(1, 4, 2, 32, torch.float32, 24, 16, 80, is_max_last=True)


def test_default_partitions_depend_only_on_shapes() -> None:
    from colocate.engine.triton_attention import MAX_PARTITIONS, default_num_partitions

    cpu = torch.device("cpu")  # DEFAULT_NUM_SMS there, so the numbers are fixed
    assert default_num_partitions(1, 2, 4096, cpu) == 64  # batch 1: split up to one tile per partition
    assert default_num_partitions(64, 2, 4096, cpu) == 5
    assert default_num_partitions(256, 8, 4096, cpu) == 1  # B * Hkv fills the GPU: single pass
    assert default_num_partitions(1, 1, 1 << 20, cpu) == MAX_PARTITIONS


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or IS_INTERPRETER, reason="CUDA graph capture needs a CUDA device, uninterpreted")
@pytest.mark.parametrize("num_partitions", [1, None])
def test_cuda_graph_replay_follows_new_lengths_and_tables(num_partitions: int | None) -> None:
    check_graph_replay(num_partitions)


def check_graph_replay(num_partitions: int | None) -> None:
    """Capture once, then change context_lens and block_tables in place: replays must follow them."""
    from colocate.engine.triton_attention import paged_decode_attention

    first = make_inputs(4, 12, 2, 128, torch.bfloat16, 16, 16, seed=1)
    second = make_inputs(4, 12, 2, 128, torch.bfloat16, 16, 16, seed=2)
    q, kv_cache = first["q"].clone(), first["kv_cache"].clone()
    block_tables, context_lens = first["block_tables"].clone(), first["context_lens"].clone()

    def step() -> torch.Tensor:
        return paged_decode_attention(q, kv_cache[0, 1], kv_cache[1, 1], block_tables, context_lens, first["scale"],
                                      num_partitions=num_partitions)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for inputs in (first, second):
        q.copy_(inputs["q"])
        kv_cache.copy_(inputs["kv_cache"])
        block_tables.copy_(inputs["block_tables"])
        context_lens.copy_(inputs["context_lens"])
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), reference(inputs, 1), atol=1e-2, rtol=1e-2)


def benchmark_decode_attention() -> None:
    """Times the kernel on the shapes that matter and prints the KV bandwidth it reaches."""
    from colocate.engine.triton_attention import default_num_partitions, paged_decode_attention

    num_q_heads, num_kv_heads, head_dim, block_size, max_blocks = 12, 2, 128, 16, 256  # max model len 4096
    dtype, num_iters = torch.bfloat16, 200
    for num_seqs, context_len in ((64, 512), (1, 4096)):
        num_blocks = num_seqs * max_blocks
        kv_cache = torch.randn(2, 1, num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
        block_tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, max_blocks).to(torch.int32)
        context_lens = torch.full((num_seqs,), context_len, device="cuda", dtype=torch.int32)
        q = torch.randn(num_seqs, num_q_heads, head_dim, device="cuda", dtype=dtype)
        kv_bytes = 2 * num_seqs * context_len * num_kv_heads * head_dim * kv_cache.element_size()
        default = default_num_partitions(num_seqs, num_kv_heads, max_blocks * block_size, q.device)
        for num_partitions in sorted({1, default}):
            def step() -> torch.Tensor:
                return paged_decode_attention(q, kv_cache[0, 0], kv_cache[1, 0], block_tables, context_lens,
                                              head_dim ** -0.5, num_partitions=num_partitions)

            for _ in range(10):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(num_iters):
                step()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / num_iters
            print(f"B={num_seqs} Hq={num_q_heads} Hkv={num_kv_heads} D={head_dim} context={context_len} "
                  f"partitions={num_partitions}{' (default)' if num_partitions == default else ''}: "
                  f"{seconds * 1e6:.1f} us, {kv_bytes / seconds / 1e9:.0f} GB/s of KV read")


def main() -> None:
    if SKIP_REASON is not None:
        print(f"skipped: {SKIP_REASON}")
        return
    for case in CASES:
        check_case(*case)
        print(f"ok {case}")
    test_reduction_rescales_when_the_max_comes_last()
    print("ok reduction rescaling")
    test_default_partitions_depend_only_on_shapes()
    print("ok default partitions")
    if HAS_CUDA and not IS_INTERPRETER:
        for num_partitions in (1, None):
            check_graph_replay(num_partitions)
            print(f"ok CUDA graph replay, num_partitions={num_partitions}")
        benchmark_decode_attention()


if __name__ == "__main__":
    main()
