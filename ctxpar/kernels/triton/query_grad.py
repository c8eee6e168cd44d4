"""Backward stage 3a (mirror of the output pass): dq, and what the queries' reads of tree nodes
give dlambda and dg.

One program per (slot, GH heads of one q/k group, V tile); for each of its heads in turn: the
intra-chunk block's dq += (lam exp(dG) * do v^T) k, then one node read per set bit h of c:
dq += w * do N^T, dlambda[log2 C + 1 + h] = carry * rowsum(q * do N^T). The heads share the q, k
tiles and one dq accumulator, which the program adds atomically into the group's float32 dq
(common.group_heads): partial buffers per head would cost H / Hk copies of dq. Every output
is linear in the V products, so wide K x V splits V into tiles (common.v_tile) whose programs add
their shares. The block's other gradients (dlambda of levels <= log2 C, dg's pairs inside the
chunk) are source_grad.py's, which multiplies q k^T for dv anyway.

dg (see dg.py): dg[r] first gets the node reads of this chunk's queries t >= r; each read's chunk
total goes to xs[slot, head, h], the share of the chunks between the node and this one.
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, gc_before, group_heads, group_tiles, head_tiles, intra_decay,
                                          intra_scales, level_grads, level_scale, load_node, local_decay, local_levels,
                                          mma, mma_f32, node_carry, num_warps, put, reads_at, row_tile, slot_info,
                                          tile_of_v, v_tile)


@triton.jit
def query_grad_kernel(q, k, v, g, lam, do, states, init, gc, dq, dlam, dg, xs, docs, slot_doc, slot_chunk, heights,
                      H, HK, K, V, L, R, NI, NH, NHP: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
                      KP: tl.constexpr, BV: tl.constexpr, GH: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr,
                      HAS_INIT: tl.constexpr):
    i, h0 = tl.program_id(0), tl.program_id(1) * GH
    vb = tile_of_v(SHARED)
    group = h0 // (H // HK)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    rk = tl.arange(0, KP)
    qk_mask = valid[:, None] & (rk[None, :] < K)
    qt, kt = group_tiles(q, k, rows, qk_mask, HK, group, K, rk)
    dq_group = tl.zeros([C, KP], dtype=tl.float32)
    for h in range(h0, h0 + GH):
        dq_group = head_query_grad(dq_group, qt, kt, v, g, lam, do, states, init, gc, dlam, dg, xs, i, h, n, c, c0,
                                   first, rows, valid, vb, heights, H, K, V, L, R, NI, NH, NHP, C, LOG_C, KP, BV,
                                   SHARED, PREC, HAS_INIT)
    tl.atomic_add(row_tile(dq, rows, HK, group, K, rk), dq_group, mask=qk_mask, sem="relaxed")


@triton.jit
def head_query_grad(dq, qt, kt, v, g, lam, do, states, init, gc, dlam, dg, xs, i, h, n, c, c0, first, rows, valid, vb,
                    heights, H, K, V, L, R, NI, NH, NHP: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr,
                    KP: tl.constexpr, BV: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr,
                    HAS_INIT: tl.constexpr):
    """dq [C, KP] plus head h's share of its group's dq; stores its dlambda, dg and xs."""
    rk, rv = tl.arange(0, KP), vb * BV + tl.arange(0, BV)
    v_mask = valid[:, None] & (rv[None, :] < V)
    dt = qt.dtype
    vt, dot_ = head_tiles(v, do, rows, v_mask, H, h, V, rv)
    gl = local_decay(g, rows, valid, H, h)
    lam_rows = level_grads(dlam, rows, h, L, R)
    w = intra_decay(gl, valid, C) * intra_scales(lam, rows, valid, local_levels(C, LOG_C), H, h, L, C, LOG_C)
    dq += mma(mma(dot_, tl.trans(vt), dt, PREC) * w, kt, dt, PREC)
    at_height = tl.arange(0, NHP)
    reads = tl.zeros([C, NHP], dtype=tl.float32)  # [t, height]: lam * dlambda of each read
    before = gc_before(gc, i, c, c0, H, h)
    node_mask = (rk[:, None] < K) & (rv[None, :] < V)
    for height in range(0, heights):
        if reads_at(c, height, c0, HAS_INIT):
            in_slots, slot, carry = node_carry(gc, gl, before, c, height, c0, first, H, h)
            node = load_node(states, init, in_slots, slot, n, h, height, H, NI, K, V, rk, rv, node_mask, HAS_INIT)
            y = mma_f32(dot_, tl.trans(node), dt, PREC)
            lam_h = level_scale(lam, rows, valid, H, h, L, LOG_C + 1 + height)
            dq += (lam_h * carry)[:, None] * y
            d_lam = carry * tl.sum(qt.to(tl.float32) * y, 1)
            put(lam_rows + (LOG_C + 1 + height) * R, d_lam, valid & (LOG_C + 1 + height < L), SHARED)
            reads += tl.where(at_height[None, :] == height, (lam_h * d_lam)[:, None], 0.0)
    # One reduction over the chunk for all heights: per height, the reduction (a barrier each)
    # and its scalar store made this kernel 1.291 ms at 8K x 4 and 6.39 at 128K against 1.247
    # and 6.11 (H200, bf16, H=32, K=128, Hk=1, V=64; two consecutive runs). Gathering the rows'
    # dlambda into one store per row as well was slower (1.271, 6.34).
    put(xs + (i * H + h) * NH + at_height, tl.sum(reads, 0), at_height < NH, SHARED)
    # "+ 0.0": Triton 3.7.1's interpreter atomically added garbage from the reversed scan itself
    # (a view it reads with the wrong strides); the sum is a fresh tensor. Compiled code: one add.
    put(dg + rows * H + h, tl.cumsum(tl.sum(reads, 1), 0, reverse=True) + 0.0, valid, SHARED)
    return dq


def query_grads(q, k, v, g, lam, do, states, init, gc, layout, prec):
    """-> dq [rows, Hk, K] f32, dlam [H, L, rows] f32, dg [rows, H] f32 (the node reads' shares;
    source_grads adds the intra-chunk block's to the last two), xs [S, H, heights] f32 (each
    chunk's node reads, per height)."""
    R, H, K, V, L = do.shape[0], do.shape[1], q.shape[2], do.shape[2], lam.shape[2]
    dq = torch.zeros(R, q.shape[1], K, device=do.device, dtype=torch.float32)
    dlam = torch.zeros(H, L, R, device=do.device, dtype=torch.float32)
    dg = torch.zeros(R, H, device=do.device, dtype=torch.float32)
    nh = max(layout.heights, 1)
    xs = torch.zeros(layout.num_slots, H, nh, device=do.device, dtype=torch.float32)
    BV, GH = v_tile(K, V, q.dtype), group_heads(H, q.shape[1])
    query_grad_kernel[(layout.num_slots, H // GH, triton.cdiv(V, BV))](
        q, k, v, g, lam, do, states, states if init is None else init, gc, dq, dlam, dg, xs, layout.docs,
        layout.slot_doc, layout.slot_chunk, layout.heights, H, q.shape[1], K, V, L, R,
        1 if init is None else init.shape[2], nh, NHP=triton.next_power_of_2(nh), C=layout.chunk,
        LOG_C=layout.chunk.bit_length() - 1, KP=triton.next_power_of_2(K), BV=BV, GH=GH, SHARED=BV < V,
        num_warps=num_warps(q.dtype), num_stages=1, PREC=prec, HAS_INIT=init is not None)
    return dq, dlam, dg, xs
