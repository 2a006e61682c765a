"""The Triton kernel behind colocate.weight_sync.copy_check: a bucket's words copied to their destinations, the
bucket's checksum and a count of NaN/inf values, all in one read of the bucket."""

import triton
import triton.language as tl


@triton.jit
def _at(address, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    # A pointer from an address in the table; the alignment hint does not pass through the cast, so give it again.
    pointer = address.to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def copy_check_kernel(words_ptr, table_ptr, num_segments, partial_ptr, bad_ptr, GATHER: tl.constexpr,
                      LOG: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, ALIGNED: tl.constexpr):
    # The table holds one row per segment of the bucket (first word, words, destination address or 0 for a gap,
    # kind: 0 none, 1 bf16, 2 fp32, 3 fp16, 4 bf16 cast from fp32), then each segment's first block
    # (num_segments + 1 entries, the last the total). Program p finds its segment by binary search (LOG
    # steps) and copies its block of BLOCK words: out of the bucket to the address (a receiver), or with
    # GATHER from the address into the bucket (a sender; kind 4 reads fp32 values and rounds them to bf16,
    # to nearest even as torch does). It writes its share of the bucket's checksum (see _checksum_kernel:
    # 32-bit tile sums, 64-bit totals) and the number of non-finite values among the words: all exponent
    # bits set, in every word of a bf16 or fp16 tensor and in the upper word of each fp32 one.
    pid = tl.program_id(0)
    firsts = table_ptr + num_segments * 4
    lo = pid * 0
    hi = lo + num_segments
    for _ in tl.static_range(LOG):
        mid = (lo + hi) // 2
        after = tl.load(firsts + mid) <= pid
        lo = tl.where(after, mid, lo)
        hi = tl.where(after, hi, mid)
    row = table_ptr + lo * 4
    seg_word = tl.load(row)
    seg_words = tl.load(row + 1)
    dst_addr = tl.load(row + 2)
    kind = tl.load(row + 3)
    if ALIGNED:  # every segment starts and ends on 8 words and every address on 16 bytes: vector accesses
        seg_word = tl.multiple_of(seg_word, 8)
        seg_words = tl.multiple_of(seg_words, 8)
        dst_addr = tl.multiple_of(dst_addr, 16)
    start = (pid - tl.load(firsts + lo)) * BLOCK
    j = tl.arange(0, BLOCK)
    mask = start + j < seg_words
    if GATHER:
        if dst_addr == 0:
            u = tl.load(words_ptr + seg_word + start + j, mask=mask, other=0).to(tl.int32) & 0xFFFF
        elif kind == 4:
            bits = tl.load(_at(dst_addr + 4 * start, tl.int32, ALIGNED) + j, mask=mask, other=0)
            bits = bits.to(tl.int64) & 0xFFFFFFFF
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
            u = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded).to(tl.int32)
        else:
            u = tl.load(_at(dst_addr + 2 * start, tl.int16, ALIGNED) + j, mask=mask, other=0).to(tl.int32) & 0xFFFF
        if dst_addr != 0:
            tl.store(words_ptr + seg_word + start + j, u.to(tl.int16), mask=mask)
    else:
        words = tl.load(words_ptr + seg_word + start + j, mask=mask, other=0)
        if dst_addr != 0:
            tl.store(_at(dst_addr + 2 * start, tl.int16, ALIGNED) + j, words, mask=mask)
        u = words.to(tl.int32) & 0xFFFF
    num_tiles: tl.constexpr = BLOCK // TILE
    tiles = tl.reshape(u, [num_tiles, TILE])
    sums = tl.sum(tiles, axis=1)
    moments = tl.sum(tiles * tl.arange(0, TILE)[None, :], axis=1)
    tile_starts = (seg_word + start + tl.arange(0, num_tiles) * TILE).to(tl.int64)
    weighted = tl.sum(tile_starts * sums.to(tl.int64) + moments.to(tl.int64), axis=0)
    tl.store(partial_ptr + pid, 2 * weighted + tl.sum(sums.to(tl.int64), axis=0))
    exponent = tl.where(kind == 3, 0x7C00, 0x7F80)
    index = seg_word + start + j
    checked = mask & (kind != 0) & ((kind != 2) | ((index & 1) == 1))
    tl.store(bad_ptr + pid, tl.sum((checked & ((u & exponent) == exponent)).to(tl.int32), axis=0))
