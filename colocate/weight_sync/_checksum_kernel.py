"""The Triton kernel behind colocate.weight_sync.checksum on CUDA: one pass over a bucket's 16-bit words."""

import triton
import triton.language as tl


@triton.jit
def checksum_kernel(words_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Program p sums w[i] * (2 i + 1) over blocks p, p + P, p + 2P, ...; int64 products and sums wrap modulo
    # 2**64 exactly as torch's do, so the partial sums add up to the reference's number.
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        words = tl.load(words_ptr + offs, mask=offs < n, other=0).to(tl.int64) & 0xFFFF
        acc += words * (offs.to(tl.int64) * 2 + 1)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))
