"""Backward stage 3b (mirror of chunk_state + the intra-chunk output): dk, dv, the intra-chunk
block's shares of dlambda, and the last shares of dg.

One program per (slot, head, V tile): the intra-chunk block (with A' = lam exp(dG):
dk += (A' * do v^T)^T q, dv += (A' * q k^T)^T do; dlambda of levels <= log2 C as per-level row
sums of exp(dG) * q k^T * do v^T) plus the chunk end state's gradient dU (the slot of the
down-swept node gradients): dv += exp(G_last - G_s) k dU, dk += exp(G_last - G_s) v dU^T. The
block's dq is query_grad's: there it starts the accumulator the node reads add to, so each
program adds one [C, K] tile atomically, not two (an H200 at 8K x 4: 0.06 ms less for the two
stages than with dq here). The heads of a q/k group add their dk into one float32 buffer with
atomics (see query_grad.py), and so do the V tiles of a wide K x V (common.v_tile): dk,
dlambda and dg are linear in the V products.

dg (see dg.py): dg[r] += the pairs of this chunk that straddle r (s < r <= t) + the pairs from
this chunk's sources s < r to later queries (each source's share <exp(G_last - G_s) k_s v_s^T, dU>)
+ the chunk's straddle total ``straddle[slot, head]``.

Height 0 of the down-sweep is done here, not in tree.down_sweep: an even chunk adds its parent's
gradient (the next slot's) to dU, and an odd chunk, whose slot is that parent, adds the transport's
dg share <exp(G_c - G_{c-1}) U_{c-1}, dU_c> to its tokens. The separate launch read three and wrote
one [K, V] tile per pair; here each slot reads one more.
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, group_tiles, head_tiles, intra_decay, intra_scales, level_grads,
                                          local_decay, local_levels, mma, mma_f32, mma_split, num_warps, put, row_tile,
                                          slot_info, tile_of_v, v_tile)


@triton.jit
def source_grad_kernel(q, k, v, g, lam, do, grads, states, gc, straddle, dk, dv, dlam, dg, docs, slot_doc, slot_chunk,
                       H, HK, K, V, L, R, C: tl.constexpr, LOG_C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                       SHARED: tl.constexpr, PREC: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    vb = tile_of_v(SHARED)
    group = h // (H // HK)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    rk, rv = tl.arange(0, KP), vb * BV + tl.arange(0, BV)
    qk_mask = valid[:, None] & (rk[None, :] < K)
    v_mask = valid[:, None] & (rv[None, :] < V)
    state_mask = (rk[:, None] < K) & (rv[None, :] < V)
    dt = q.dtype.element_ty
    qt, kt = group_tiles(q, k, rows, qk_mask, HK, group, K, rk)
    vt, dot_ = head_tiles(v, do, rows, v_mask, H, h, V, rv)
    gl = local_decay(g, rows, valid, H, h)
    decay = intra_decay(gl, valid, C)
    lev = local_levels(C, LOG_C)
    scales = intra_scales(lam, rows, valid, lev, H, h, L, C, LOG_C)
    dp = mma(dot_, tl.trans(vt), dt, PREC)
    qk = mma(qt, tl.trans(kt), dt, PREC)
    pair = qk * dp * decay
    lam_rows = level_grads(dlam, rows, h, L, R)
    for level in tl.static_range(LOG_C + 1):
        put(lam_rows + level * R, tl.sum(tl.where(lev == level, pair, 0.0), 1), valid & (level < L), SHARED)
    pair_share = straddling_pairs(pair * scales, C, dt, PREC)
    w = decay * scales
    dv_h = mma(tl.trans(qk * w), dot_, dt, PREC)
    dpw = dp * w
    dk_h = mma(tl.trans(dpw), qt, dt, PREC)

    total = tl.sum(tl.where(tl.arange(0, C) == C - 1, gl, 0.0))
    to_end = tl.where(valid, tl.exp(total - gl), 0.0)
    tile = rk[:, None] * V + rv[None, :]
    du = tl.load(grads + (i * H + h).to(tl.int64) * K * V + tile, mask=state_mask, other=0.0)
    left_child = ((c & 1) == 0) & (c < c_last)  # masked loads: no traffic where False
    right_child = ((c & 1) == 1) & (c > c0)
    gc_here = tl.load(gc + i * H + h)
    # Off a pair the decays are exp(0) = 1 times zero tiles (an unrelated slot's exp could be inf).
    up = tl.exp(tl.where(left_child, tl.load(gc + (i + 1) * H + h, mask=left_child, other=0.0) - gc_here, 0.0)
                .to(tl.float32))
    du += up * tl.load(grads + ((i + 1) * H + h).to(tl.int64) * K * V + tile, mask=state_mask & left_child, other=0.0)
    across = tl.exp(tl.where(right_child, gc_here - tl.load(gc + (i - 1) * H + h, mask=right_child, other=0.0), 0.0)
                    .to(tl.float32))
    left = tl.load(states + ((i - 1) * H + h).to(tl.int64) * K * V + tile, mask=state_mask & right_child, other=0.0)
    transport = across * tl.sum(left * du)
    k_du = to_end[:, None] * mma_f32(kt, du, dt, PREC)
    dv_h += k_du
    dk_h += to_end[:, None] * mma_f32(vt, tl.trans(du), dt, PREC)
    tl.store(row_tile(dv, rows, H, h, V, rv), dv_h.to(dv.dtype.element_ty), mask=v_mask)
    tl.atomic_add(row_tile(dk, rows, HK, group, K, rk), dk_h, mask=qk_mask, sem="relaxed")

    outgoing = tl.sum(k_du * vt.to(tl.float32), 1)
    share = pair_share + tl.cumsum(outgoing, 0) - outgoing + tl.load(straddle + i * H + h) * (vb == 0) + transport
    dg_ptr = dg + rows * H + h
    if SHARED:
        tl.atomic_add(dg_ptr, share, mask=valid, sem="relaxed")
    else:
        tl.store(dg_ptr, tl.load(dg_ptr, mask=valid) + share, mask=valid)


@triton.jit
def straddling_pairs(pairs, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """[C]: for each r, the sum of pairs[t, s] over s < r <= t (pairs is lower triangular).

    The sums over s < r are one product with a constant triangle of ones, not a running sum:
    each is its own dot product, so the diagonal (s == t, no decay, often the largest term) never
    enters a sum it would cancel out of again. On an H200 (bf16, 8K x 4) the scan it replaced
    took 0.03-0.05 ms more of this kernel. The product is taken as [r, t] and summed along rows:
    the sum over t stays within each thread's rows of the accumulator (sm_90, Triton 3.6: 5312
    SASS instructions instead of 5848, 59 shuffles instead of 107), and source_grad ran 1.422 ->
    1.358 ms at 8K x 4 and 5.64 -> 5.56 at 128K (H=32, K=128, Hk=1, V=64)."""
    r = tl.arange(0, C)
    before = mma_split((r[:, None] > r[None, :]).to(DT), tl.trans(pairs), DT, PREC)  # [r, t]: sum over s < r
    return tl.sum(tl.where(r[:, None] <= r[None, :], before, 0.0), 1)


def source_grads(q, k, v, g, lam, do, grads, states, gc, straddle, dlam, dg, layout, prec):
    """-> dk [rows, Hk, K] f32, dv [rows, H, V] (v's dtype); adds the intra-chunk block's shares
    into query_grads' dlam and dg (grads: down-swept to height 1; states: the up-swept tree, or
    its bf16 copy; straddle [S, H]: each chunk's share from pairs on both sides of it, dg.py)."""
    H, K, V, L = v.shape[1], q.shape[2], v.shape[2], lam.shape[2]
    dk = torch.zeros(v.shape[0], q.shape[1], K, device=v.device, dtype=torch.float32)
    dv = torch.empty_like(v)
    BV = v_tile(K, V, q.dtype)
    source_grad_kernel[(layout.num_slots, H, triton.cdiv(V, BV))](
        q, k, v, g, lam, do, grads, states, gc, straddle, dk, dv, dlam, dg, layout.docs, layout.slot_doc,
        layout.slot_chunk, H, q.shape[1], K, V, L, dlam.shape[2], C=layout.chunk, LOG_C=layout.chunk.bit_length() - 1,
        KP=triton.next_power_of_2(K), BV=BV, SHARED=BV < V, num_warps=num_warps(q.dtype), PREC=prec)
    return dk, dv
