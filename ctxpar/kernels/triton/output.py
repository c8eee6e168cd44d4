"""Stage 3 (counterparts: ``torch_chunked.intra_output`` + ``read_tree``): the output of each chunk.

One program per (slot, head, V tile): the intra-chunk block (levels <= log2 C, lambda gathered per
pair) plus one node read per set bit h of the chunk index, node ((c >> h) - 1, h) carried to each
query by exp(G_t - G_node_end) and weighed by lambda level log2(C) + 1 + h.
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, gc_before, intra_decay, intra_scales, level_scale, load_node,
                                          local_decay, local_levels, mma, mma_f32, node_carry, num_warps, reads_at,
                                          register_cap, row_tile, slot_info)


@triton.jit
def output_kernel(q, k, v, g, lam, states, init, gc, o, docs, slot_doc, slot_chunk, heights, H, HK, K, V, L, NI,
                  C: tl.constexpr, LOG_C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                  HAS_INIT: tl.constexpr):
    i, h, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    rk = tl.arange(0, KP)
    rv = vb * BV + tl.arange(0, BV)
    group = h // (H // HK)
    qk_mask = valid[:, None] & (rk[None, :] < K)
    dt = q.dtype.element_ty
    qt = tl.load(row_tile(q, rows, HK, group, K, rk), mask=qk_mask, other=0.0)
    kt = tl.load(row_tile(k, rows, HK, group, K, rk), mask=qk_mask, other=0.0)
    v_mask = valid[:, None] & (rv[None, :] < V)
    vt = tl.load(row_tile(v, rows, H, h, V, rv), mask=v_mask, other=0.0)
    gl = local_decay(g, rows, valid, H, h)
    lev = local_levels(C, LOG_C)
    w = intra_scales(lam, rows, valid, lev, H, h, L, C, LOG_C) * intra_decay(gl, valid, C)
    scores = mma(qt, tl.trans(kt), dt, PREC)
    acc = mma(scores * w, vt, dt, PREC)

    before = gc_before(gc, i, c, c0, H, h)
    node_mask = (rk[:, None] < K) & (rv[None, :] < V)
    for height in range(0, heights):
        if reads_at(c, height, c0, HAS_INIT):
            in_slots, slot, carry = node_carry(gc, gl, before, c, height, c0, first, H, h)
            node = load_node(states, init, in_slots, slot, n, h, height, H, NI, K, V, rk, rv, node_mask, HAS_INIT)
            weight = level_scale(lam, rows, valid, H, h, L, LOG_C + 1 + height) * carry
            acc += weight[:, None] * mma_f32(qt, node, dt, PREC)
    tl.store(row_tile(o, rows, H, h, V, rv), acc.to(o.dtype.element_ty), mask=v_mask)


def outputs(q, k, v, g, lam, states, init, gc, layout, prec):
    """-> o [rows, H, V] in v's dtype (every real row written)."""
    H, K, V, L = v.shape[1], q.shape[2], v.shape[2], lam.shape[2]
    o = torch.empty_like(v)
    BV, KP = min(64, triton.next_power_of_2(V)), triton.next_power_of_2(K)
    # The cap was measured at K = 128; at K = 256 it would make ptxas spill 472 bytes a thread
    # (40 uncapped; Triton 3.6, sm_90, kernel_resources.py).
    cap = register_cap(q.dtype, 3, num_warps(q.dtype)) if KP <= 128 else None
    grid = (layout.num_slots, H, triton.cdiv(V, BV))
    output_kernel[grid](q, k, v, g, lam, states, states if init is None else init, gc, o, layout.docs,
                        layout.slot_doc, layout.slot_chunk, layout.heights, H, q.shape[1], K, V, L,
                        1 if init is None else init.shape[2], C=layout.chunk, LOG_C=layout.chunk.bit_length() - 1,
                        KP=KP, BV=BV, num_warps=num_warps(q.dtype), maxnreg=cap, PREC=prec,
                        HAS_INIT=init is not None)
    return o
