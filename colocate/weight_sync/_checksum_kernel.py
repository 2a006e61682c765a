"""The Triton kernel behind colocate.weight_sync.checksum on CUDA: one pass over a bucket's 16-bit words."""

import triton
import triton.language as tl


@triton.jit
def checksum_kernel(words_ptr, out_ptr, n, BLOCK: tl.constexpr, TILE: tl.constexpr):
    # Program p sums w[i] * (2 i + 1) = 2 i w[i] + w[i] over blocks p, p + P, p + 2P, ... For a tile of TILE
    # words starting at t0, sum i w[i] = t0 * S + sum_j j w[t0 + j] with S the tile's word sum: with
    # TILE = 256 both fit 32 bits (S < 2**24, sum_j j w < 255 * 128 * 65535 < 2**31), so each word costs
    # 32-bit operations and each tile one 64-bit multiply-add. 64-bit sums wrap modulo 2**64 exactly as
    # torch's do, so the partial sums add up to the reference's number.
    pid = tl.program_id(0)
    num_tiles: tl.constexpr = BLOCK // TILE
    weighted = tl.zeros([num_tiles], dtype=tl.int64)
    plain = tl.zeros([num_tiles], dtype=tl.int64)
    j = tl.arange(0, TILE)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        words = tl.load(words_ptr + offs, mask=offs < n, other=0).to(tl.int32) & 0xFFFF
        tiles = tl.reshape(words, [num_tiles, TILE])
        sums = tl.sum(tiles, axis=1)  # [num_tiles] int32
        moments = tl.sum(tiles * j[None, :], axis=1)  # [num_tiles] int32
        tile_starts = (start + tl.arange(0, num_tiles) * TILE).to(tl.int64)
        weighted += tile_starts * sums.to(tl.int64) + moments.to(tl.int64)
        plain += sums.to(tl.int64)
    tl.store(out_ptr + pid, 2 * tl.sum(weighted, axis=0) + tl.sum(plain, axis=0))
