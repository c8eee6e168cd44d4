"""Backward stage 1 (mirror of the node reads): the gradient of every read tree node.

Node ((c >> h) - 1, h) is read by the chunks of its right sibling, which are consecutive, so its
gradient sum over their tokens t of lam_t[log2 C + 1 + h] exp(G_t - G_node_end) q_t do_t^T is one
GEMM over a contiguous run of tokens. A program owns a segment of at most ``layout.segment`` of
those chunks (layout.node_segments), one head and one K x V tile: a branch-free loop over the
segment's chunks (so its loads pipeline), then one write to the node. Nodes read by more chunks
than a segment holds get one atomic add per segment; the others have a single writer, which stores.

(The first version looped over every height for a group of chunks and branched on each chunk's
bit, reloading q and dO once per height: 21.9 ms at 128K tokens on an H200 (H=32, K=128, V=64,
bf16), 4.9 ms now.)
"""

import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, gc_before, level_scale, local_decay, mma_f32, node_at, node_carry,
                                          num_warps, register_cap, row_tile, state_offsets)

# Swept at 128K tokens on an H200 (segments of 8-64 chunks, 4 or 8 warps, 1-3 stages, K tiles of
# 64 or 128): 4 warps and one stage take 4.9-5.3 ms, 8 warps 8.0-9.5 ms, 64-wide K tiles 6.0 ms;
# the segment length matters little.
NUM_STAGES = 1


@triton.jit
def node_grad_kernel(q, do, g, lam, gc, grads, init_grads, docs, segments, H, HK, K, V, L, NI,
                     C: tl.constexpr, LOG_C: tl.constexpr, SEGMENT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, PREC: tl.constexpr, HAS_INIT: tl.constexpr):
    s, h, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg = segments + s * 4
    n, height, c_first, count = tl.load(seg), tl.load(seg + 1), tl.load(seg + 2), tl.load(seg + 3)
    row = docs + n * 6
    token_start, t0, length = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    c0, first = tl.load(row + 3), tl.load(row + 5)
    rk = tile // tl.cdiv(V, BV) * BK + tl.arange(0, BK)
    rv = tile % tl.cdiv(V, BV) * BV + tl.arange(0, BV)
    group = h // (H // HK)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for r in range(count):
        c = c_first + r
        i = first + c - c0
        rows, valid = chunk_rows(c, token_start, t0, length, C)
        gl = local_decay(g, rows, valid, H, h)
        _, _, carry = node_carry(gc, gl, gc_before(gc, i, c, c0, H, h), c, height, c0, first, H, h)
        weight = level_scale(lam, rows, valid, H, h, L, LOG_C + 1 + height) * carry
        qt = tl.load(row_tile(q, rows, HK, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
        dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
        acc += mma_f32(tl.trans(qt), dot_ * weight[:, None], q.dtype.element_ty, PREC)
    in_slots, slot = node_at(c_first, height, c0, first)
    o_slot, o_init = state_offsets(slot, n, h, height, H, NI, K, V, rk, rv)
    out = tl.where(in_slots, grads + o_slot, init_grads + o_init)
    mask = (rk[:, None] < K) & (rv[None, :] < V) & (in_slots | HAS_INIT)
    if (1 << height) > SEGMENT:  # the node's readers span several segments
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc, mask=mask)


def node_grads(q, do, g, lam, gc, grads, init_grads, layout, prec):
    """The read nodes' gradients into grads [S, H, K, V] (and init_grads [N, H, NI, K, V]): stored
    where one program is a node's only writer, added elsewhere, so only ``layout.shared_slots``
    (and init_grads) need zeros before. The single writers' stores replaced a load-add-store into a
    zeroed buffer: a fill and a read of the [S, H, K, V] float32 buffer (2 GiB at 128K tokens)."""
    H, K, V, L = do.shape[1], q.shape[2], do.shape[2], lam.shape[2]
    BK, BV = min(128, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    # Without an initial state the segments reading initial nodes (the last ones) add nothing.
    count = layout.segments.shape[0] if init_grads is not None else layout.segments_in_slots
    if count == 0:
        return
    grid = (count, H, triton.cdiv(K, BK) * triton.cdiv(V, BV))
    node_grad_kernel[grid](q, do, g, lam, gc, grads, grads if init_grads is None else init_grads, layout.docs,
                           layout.segments, H, q.shape[1], K, V, L,
                           1 if init_grads is None else init_grads.shape[2], C=layout.chunk,
                           LOG_C=layout.chunk.bit_length() - 1, SEGMENT=layout.segment, BK=BK, BV=BV,
                           num_warps=num_warps(q.dtype), num_stages=NUM_STAGES, maxnreg=register_cap(q.dtype, 3),
                           PREC=prec, HAS_INIT=init_grads is not None)
