"""GDN backward of stage 1 (mirror of gdn_chunk.py): the chunk stage's input gradients.

From the gradients of the chunk's outputs (intra output dO, Qt, U, M; the tree's autograd
produced the last three) and the forward's N and P, the chain rule backwards through:

    o = (P * lam) V, P = S T, S = Q K^T * Gam     Qt = e^G Q - S W, W = T Kd, Kd = e^G K
    U = Kt^T T V, M = e^G_C I - Kt^T W, Kt = e^(G_C - G) K
    T = N diag(beta), N = (I + A)^-1, A = diag(beta) strict(K K^T * Gam)  ->  dA = -N^T dN N^T

Every dependence on the decays goes through dG (per position, then a reverse cumsum inside the
chunk: dg_r = sum over t >= r of dG_t); pairs inside Gam give row sum minus column sum of
dGam * Gam, and G_C (the last position) collects the chunk-end terms. Padded positions are zero
tokens: they contribute nothing and their gradients are not stored.

dq, dk: the heads of a q/k group add into one float32 buffer with atomics (as query_grad.py). With
a q/k head per head (Hk = H) each element has one writer: tile_grad stores dq, and dk with
state_grad's share (stored by it in float32) added, straight in the inputs' dtype, as it does dv -
no zero fills of dq and dk, no atomics and no casts after: the op at 128K tokens (bf16, H=16,
K=V=128, an H200) 61.4 -> 59.4 ms, and 91.6 -> 89.5 at H=6, K=192, V=384 (results/2026-12-02-h200-gdn-session20.json).
dlambda: the levels <= log2 C of this chunk's pairs; the tree's levels come from autograd.

Four kernels, in this order. The one program per (slot, head) before ran about a hundred small
dependent products in a row, two programs per SM, 255 registers and 2.7 KB of spills a thread on
sm_90 (35 ms at 128K tokens, H=16, K=V=128 on an H200; most likely bound by that chain's latency):
- state_grad, one per (slot, head, K tile): that tile's rows of E = dU V^T - dM Kd^T, the
  chunk-end states' share, and from them its columns of dKt = T E^T (into dk and dG) and its
  part of Kt E (into a [S, H, C, C] buffer of dT's);
- pairs_grad, one per (slot, head): the sums over all V and K columns, one product a tile, into
  D = dO V^T * lam - dQt Kd^T; then dS = D T^T, dT = S^T D + Kt E, through the inverse to dA,
  dbeta, dlambda and the pairs' dG; it stores dSg = dS * Gam and dKK + dKK^T (dKK = diag(beta)
  dA * Gam) [C, C] for the next kernel's products with q and k;
- tile_grad, one program per (slot, head, tile), tiles adjacent: a V tile's dv (all of it:
  dv = (P * lam)^T dO + T^T Kt dU) or a K tile's dKd = -(P^T dQt + T^T Kt dM), its e^G shares
  of dq, dk and dG, and its columns of the pairs' dq = dSg K and dk = (dKK + dKK^T) K + dSg^T Q;
- decay_grad, one per (slot, head): dg, the reverse cumsum of dG over the chunk.
pairs_grad is what was finish_grad, which also took the pairs' dq, dk over all K columns (three
[C, C] x [C, K] products, q and k loaded again, and two [C, K] atomic adds a program) after
tile_grad, so tile_grad's K tiles could not take them: the op 65.6 -> 63.1 ms at 128K tokens
(H=16, K=V=128; H=6, K=192, V=384: 94.4 -> 92.6; results/2026-12-02-h200-gdn-session20.json).
finish_grad's sums are those of a one-kernel restructure measured and not kept, with dv and dKd
still in its loops: 49.4 ms against the one kernel's 36.4 at H=16, K=V=128 on an H200
(benchmarks/results/2026-12-01-h200-gdn-session17-ab.json). tile_grad and finish_grad with E
still in the latter took 9.4 + 20.9 ms there, against the one kernel's 35.4, and the op 96.3 ->
90.7 ms (H=6, K=192, V=384: 159.6 -> 158.8; ...-session18-ab.json). Moving E out took finish_grad
from 112 to 96 KiB of shared memory and 2720 to 1152 B of spills (sm_90, Triton 3.6, K=V=128;
state_grad: 48 KiB, 174 registers, none spilled) and the op 91.5 -> 87.2 ms (H=6, K=192, V=384:
136.5 -> 129.9; ...-session19-ab.json).
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, intra_decay, intra_scales, local_decay, local_levels, mma,
                                          mma_f32, num_warps, put, row_tile, slot_info, tiles_adjacent, token_tile)
from ctxpar.kernels.triton.gdn_chunk import chunk_decays, chunk_grams, qk_columns, square_tile
from ctxpar.kernels.triton.gdn_tree import tile_of

# Double-buffered loads in state_grad's and pairs_grad's tile loops (one stage was set when
# finish_grad also loaded [K, 64] float32 tiles of dU and dM, 64 KB each at K = 256). Swept alone on
# an H200 at 8K tokens x 4 (bf16): the op 9.98 -> 9.86 ms at H=16, K=V=128, 11.39 -> 11.31 at H=6,
# K=192, V=384; with PAIRS_WARPS = 4 (from 8) too: 10.00 -> 9.68 and 11.35 -> 11.21 ms, and at 128K
# tokens 42.73 -> 41.42 and 51.49 -> 50.67 (results/2026-12-02-h200-gdn-session25.json).
NUM_STAGES = 2
# tile_grad's V and K tiles, state_grad's rows of E, the loops' steps. Not swept; tile_grad's V tiles
# 128 wide at 8 warps (222 registers, no spills, sm_90) took the op at 128K tokens on an H200 from
# 45.81 to 48.44 ms (H=16, K=V=128; results/2026-12-02-h200-gdn-session23.json).
TILE = 64
# tile_grad's pipeline stages, Triton's default. Swept on an H200 at 8K tokens x 4 (bf16): 1 and 2 took the
# op from 9.68 to 9.62 and 9.73 ms at H=16, K=V=128 (H=6, K=192, V=384: 11.14 -> 11.15, 11.22;
# results/2026-12-02-h200-gdn-session26.json, before the bf16 tree gradients): within a run's spread, left at 3.
TILE_STAGES = 3
# pairs_grad's warps (measured as finish_grad's). With E still in it, 8 (against 4) took the op from
# 159.4 to 152.8 ms at 128K tokens where K pads to 256 (H=6, K=192, V=384, an H200) and from 91.1
# to 96.9 at K = V = 128 (results/2026-12-01-h200-gdn-session18-configs.json); without E
# (state_grad) it spills 416 bytes a thread at 8 warps against 1152 at 4 (sm_90, K = V = 128), and
# 8 took the op from 78.2 to 76.8 ms there (benchmarks/results/2026-12-01-h200-gdn-session19-ab2.json).
# With PAIRS_STEP 128 and two stages, 4 is faster again (NUM_STAGES above; alone at 8K x 4: 9.98 ->
# 9.83 ms at H=16, 11.39 -> 11.35 at H=6) though it spills 440 bytes a thread at K = V = 128 and 448
# at K = 192 (sm_90, Triton 3.6, bf16, two stages: 64 KiB of shared memory).
PAIRS_WARPS = 4
# pairs_grad's steps over V and K (TILE, 64, before): one step at K = V = 128 where there were two of
# each loop's loads and products; sm_90, Triton 3.6, bf16, 255 registers: no spills at K = V = 128
# and 8 bytes at K = 192, V = 384 (64: 24 bytes at both), 48 KiB of shared memory (32); float32
# inputs 4.2 KB of spills (5.7). The op on an H200 at 128K tokens: 43.42 -> 42.77 ms (H=16,
# K=V=128), 56.30 -> 55.89 (H=6, K=192, V=384); 8K x 4, H=16: 10.15 -> 10.00
# (results/2026-12-02-h200-gdn-session24.json).
PAIRS_STEP = 128


@triton.jit
def kt_times(k, src, rows, valid, e_out, node, HK, group, K, N, cols, C: tl.constexpr, BK: tl.constexpr,
             BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Kt X[:, cols] [C, BN] for X = node's [K, N] rows of src (dU or dM), Kt = e^(G_C - G) K: K X
    over slices of BK of K, the decays after. Whole [C, K] rows of Kt stayed live beside the tile's
    products (sm_90, Triton 3.6, bf16: 255 registers and 768 bytes of spills a thread at K = 192)."""
    acc = tl.zeros([C, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kt = token_tile(k, rows, valid, HK, group, K, rk)
        acc += mma_f32(kt, tile_of(src, node, K, N, rk, cols, False), DT, PREC)
    return acc * e_out[:, None]


@triton.jit
def tile_grad_kernel(q, k, v, g, beta, lam, inv, pairs, do, dqt, du, dm, d_sg, d_kk2, dq, dk, dk_state, dv, dg_in,
                     docs, slot_doc, slot_chunk, tree_rows, scale, H, HK, K, V, L, C: tl.constexpr, LOG_C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, SHARED: tl.constexpr,
                     PREC: tl.constexpr):
    nv = tl.cdiv(V, BV)
    i, h, t = tiles_adjacent(H, nv + tl.cdiv(K, BK))
    DT: tl.constexpr = k.dtype.element_ty  # the products' operands (mma_f32)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    group = h // (H // HK)
    r = tl.arange(0, C)
    head = (i * H + h).to(tl.int64)
    node = (tl.load(tree_rows + i) * H + h).to(tl.int64)  # dU, dM rows: as the forward's U, M
    gl, total, bt = chunk_decays(g, beta, rows, valid, h, H, C)
    ut = tl.load(square_tile(inv, i, h, H, C)) * bt[None, :]
    e_out = tl.where(valid, tl.exp(total - gl), 0.0)
    p = tl.load(square_tile(pairs, i, h, H, C))
    if t < nv:  # dv = (P * lam)^T dO + T^T (Kt dU)
        rv = t * BV + tl.arange(0, BV)
        d_o = token_tile(do, rows, valid, H, h, V, rv)
        kt_du = kt_times(k, du, rows, valid, e_out, node, HK, group, K, V, rv, C, BK, BV, DT, PREC)
        scaled = p * intra_scales(lam, rows, valid, local_levels(C, LOG_C), H, h, L, C, LOG_C)
        d_v = mma_f32(tl.trans(scaled), d_o, DT, PREC) + mma_f32(tl.trans(ut), kt_du, DT, PREC)
        tl.store(row_tile(dv, rows, H, h, V, rv), d_v.to(dv.dtype.element_ty), mask=valid[:, None] & (rv[None, :] < V))
    else:  # dKd = -(P^T dQt + T^T (Kt dM)); Qt and Kd carry e^G Q and e^G K; the pairs' dq, dk columns
        rc = (t - nv) * BK + tl.arange(0, BK)
        col_mask = valid[:, None] & (rc[None, :] < K)
        e_in = tl.where(valid, tl.exp(gl), 0.0)
        qc, kc = qk_columns(q, k, rows, valid, HK, group, K, rc)
        qc *= scale  # the query's columns
        d_qc = tl.load(dqt + (head * C + r[:, None]) * K + rc[None, :], mask=rc[None, :] < K, other=0.0)
        kt_dm = kt_times(k, dm, rows, valid, e_out, node, HK, group, K, K, rc, C, BK, BK, DT, PREC)
        d_kd = -mma_f32(tl.trans(p), d_qc, DT, PREC) - mma_f32(tl.trans(ut), kt_dm, DT, PREC)
        tl.atomic_add(dg_in + head * C + r, e_in * tl.sum(qc * d_qc + kc * d_kd, 1), sem="relaxed")
        sg, kk2 = tl.load(square_tile(d_sg, i, h, H, C)), tl.load(square_tile(d_kk2, i, h, H, C))
        d_q = (d_qc * e_in[:, None] + mma_f32(sg, kc, DT, PREC)) * scale  # q's, not the query's
        d_k = d_kd * e_in[:, None] + mma_f32(kk2, kc, DT, PREC) + mma_f32(tl.trans(sg), qc, DT, PREC)
        if not SHARED:  # these columns' one writer: state_grad's share in, the inputs' dtype out
            d_k += token_tile(dk_state, rows, valid, HK, group, K, rc)
        put(row_tile(dq, rows, HK, group, K, rc), d_q.to(dq.dtype.element_ty), col_mask, SHARED)
        put(row_tile(dk, rows, HK, group, K, rc), d_k.to(dk.dtype.element_ty), col_mask, SHARED)


@triton.jit
def state_grad_kernel(k, v, g, beta, inv, du, dm, dk, dg_in, d_tt, docs, slot_doc, slot_chunk, tree_rows, H, HK, K, V,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SHARED: tl.constexpr,
                      PREC: tl.constexpr):
    """Rows rb of E = dU V^T - dM Kd^T (one program per slot, head and K tile, tiles adjacent) and
    what they give: columns rb of dKt = T E^T (into dk: added, or stored where the head has its own
    k, SHARED False; and G's out-scaling share into dg_in), and their part of Kt E, the chunk-end
    states' share of dT (into d_tt)."""
    i, h, t = tiles_adjacent(H, tl.cdiv(K, BK))
    DT: tl.constexpr = k.dtype.element_ty  # the products' operands (mma_f32)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    group = h // (H // HK)
    r, rb = tl.arange(0, C), t * BK + tl.arange(0, BK)
    head = (i * H + h).to(tl.int64)
    node = (tl.load(tree_rows + i) * H + h).to(tl.int64)
    # chunk_decays' G and G_C without its beta, loaded after E's loops: loaded with the decays it
    # stayed live through them (sm_90, Triton 3.6, K = V = 128: 193 registers against 174)
    gl = local_decay(g, rows, valid, H, h)
    total = tl.sum(tl.where(r == C - 1, gl, 0.0))
    e_in, e_out = tl.where(valid, tl.exp(gl), 0.0), tl.where(valid, tl.exp(total - gl), 0.0)
    e = tl.zeros([BK, C], dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BV)):
        rv = vb * BV + tl.arange(0, BV)
        vt = token_tile(v, rows, valid, H, h, V, rv)
        e += mma_f32(tile_of(du, node, K, V, rb, rv, False), tl.trans(vt), DT, PREC)
    for kb in range(0, tl.cdiv(K, BK)):
        rc = kb * BK + tl.arange(0, BK)
        d_m = tile_of(dm, node, K, K, rb, rc, False)
        e -= mma_f32(d_m, tl.trans(token_tile(k, rows, valid, HK, group, K, rc)), DT, PREC) * e_in[None, :]
    bt = tl.load(beta + rows * H + h, mask=valid, other=0.0).to(tl.float32)
    ut = tl.load(square_tile(inv, i, h, H, C)) * bt[None, :]
    mask = valid[:, None] & (rb[None, :] < K)
    kc = token_tile(k, rows, valid, HK, group, K, rb).to(tl.float32)
    d_kout = mma_f32(ut, tl.trans(e), DT, PREC)
    tl.atomic_add(square_tile(d_tt, i, h, H, C), mma_f32(kc, e, DT, PREC) * e_out[:, None], sem="relaxed")
    # G's share: Kt = e^(G_C - G) K, its -G rows and the chunk end's G_C.
    share = e_out * tl.sum(kc * d_kout, 1)
    tl.atomic_add(dg_in + head * C + r, tl.where(r == C - 1, tl.sum(share), 0.0) - share, sem="relaxed")
    put(row_tile(dk, rows, HK, group, K, rb), d_kout * e_out[:, None], mask, SHARED)


@triton.jit
def pairs_grad_kernel(q, k, v, g, beta, lam, inv, pairs, do, dqt, dm, dbeta, dlam, dg_in, d_tt, d_kk2, docs, slot_doc,
                      slot_chunk, tree_rows, scale, H, HK, K, V, L, C: tl.constexpr, LOG_C: tl.constexpr,
                      KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    DT: tl.constexpr = k.dtype.element_ty  # the products' operands (mma_f32)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    group = h // (H // HK)
    r, rk = tl.arange(0, C), tl.arange(0, KP)
    head = (i * H + h).to(tl.int64)
    node = (tl.load(tree_rows + i) * H + h).to(tl.int64)

    # The sums over V and K columns: dO V^T, then D (see the module docstring).
    dov = tl.zeros([C, C], dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BV)):
        rv = vb * BV + tl.arange(0, BV)
        vt = token_tile(v, rows, valid, H, h, V, rv)
        d_o = token_tile(do, rows, valid, H, h, V, rv)
        dov += mma(d_o, tl.trans(vt), v.dtype.element_ty, PREC)  # dO: the output's gradient, in v's dtype
    gl, total, bt = chunk_decays(g, beta, rows, valid, h, H, C)
    gam = intra_decay(gl, valid, C)
    qk, kk = chunk_grams(q, k, rows, valid, HK, group, K, C, BK, PREC, True)
    s = qk * (gam * scale)
    nt = tl.load(square_tile(inv, i, h, H, C))
    ut = nt * bt[None, :]
    p = tl.load(square_tile(pairs, i, h, H, C))  # the forward's P, as its output took it
    lev = local_levels(C, LOG_C)
    for level in tl.static_range(LOG_C + 1):
        tl.store(dlam + (rows * H + h) * L + level, tl.sum(tl.where(lev == level, dov * p, 0.0), 1),
                 mask=valid & (level < L))
    d_acc = dov * intra_scales(lam, rows, valid, lev, H, h, L, C, LOG_C)
    e_in = tl.where(valid, tl.exp(gl), 0.0)
    for kb in range(0, tl.cdiv(K, BK)):
        rc = kb * BK + tl.arange(0, BK)
        d_qc = tl.load(dqt + (head * C + r[:, None]) * K + rc[None, :], mask=rc[None, :] < K, other=0.0)
        d_acc -= mma_f32(d_qc, tl.trans(token_tile(k, rows, valid, HK, group, K, rc)), DT, PREC) * e_in[None, :]
    d_t = mma_f32(tl.trans(s), d_acc, DT, PREC) + tl.load(square_tile(d_tt, i, h, H, C))
    d_s = mma_f32(d_acc, tl.trans(ut), DT, PREC)

    # Through the inverse: T = N diag(beta), N = (I + A)^-1.
    d_beta = tl.sum(nt * d_t, 0)
    d_a = -mma_f32(mma_f32(tl.trans(nt), d_t * bt[None, :], DT, PREC), tl.trans(nt), DT, PREC)
    d_a = tl.where(r[:, None] > r[None, :], d_a, 0.0)
    d_beta += tl.sum(d_a * kk * gam, 1)
    d_kk = bt[:, None] * d_a * gam
    # The pairs' gradients dq = dSg K, dk = (dKK + dKK^T) K + dSg^T Q, taken per K tile by tile_grad:
    # dSg replaces the tile's dT share (read above), dKK + dKK^T goes to d_kk2.
    tl.store(square_tile(d_tt, i, h, H, C), d_s * gam)
    tl.store(square_tile(d_kk2, i, h, H, C), d_kk + tl.trans(d_kk))

    # Decays: pairs (row sum - column sum of dGam * Gam) and G_C's trace of dM (M = e^G_C I - ...),
    # into dg_in beside tile_grad's and state_grad's in/out scalings.
    d_trace = tl.sum(tl.load(dm + node * K * K + rk * (K + 1), mask=rk < K, other=0.0).to(tl.float32))
    z = bt[:, None] * d_a * kk * gam + d_s * s
    d_gl = tl.sum(z, 1) - tl.sum(z, 0) + tl.where(r == C - 1, tl.exp(total) * d_trace, 0.0)
    tl.atomic_add(dg_in + head * C + r, d_gl, sem="relaxed")
    tl.store(dbeta + rows * H + h, d_beta, mask=valid)


@triton.jit
def decay_grad_kernel(dg_in, dg, docs, slot_doc, slot_chunk, H, C: tl.constexpr):
    """dg of the chunk's tokens: the reverse cumsum of dG inside the chunk (dg_r = sum over t >= r
    of dG_t), once every stage has added its share."""
    i, h = tl.program_id(0), tl.program_id(1)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    d_gl = tl.load(dg_in + (i * H + h).to(tl.int64) * C + tl.arange(0, C))
    tl.store(dg + rows * H + h, tl.cumsum(d_gl, 0, reverse=True), mask=valid)


def chunk_stage_grads(q, k, v, g, beta, lam, scale, inv, pairs, d_o, d_qt, d_u, d_m, layout, prec, tree_rows):
    """Gradients of gdn_chunk.chunk_stage's outputs (each in its output's dtype and layout: d_o in
    token rows, dU, dM at rows tree_rows; inv, pairs its N and P) -> dq, dk [rows, Hk, K] (float32
    where Hk < H, else in q's dtype), dv [rows, H, V] in v's dtype, dg, dbeta [rows, H], dlam
    [rows, H, L] (levels <= log2 C), float32."""
    R, H, Hk, K, V, L = v.shape[0], v.shape[1], k.shape[1], k.shape[2], v.shape[2], lam.shape[2]
    S, C = layout.num_slots, layout.chunk
    f32 = dict(device=v.device, dtype=torch.float32)
    shared = Hk < H  # a q/k group's heads add into its dq, dk
    if shared:
        dq, dk = torch.zeros(R, Hk, K, **f32), torch.zeros(R, Hk, K, **f32)
        dk_state = dk
    else:
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dk_state = torch.empty(R, H, K, **f32)  # state_grad's share, which tile_grad adds to its own
    dv, dg, dbeta = torch.empty_like(v), torch.empty(R, H, **f32), torch.empty(R, H, **f32)
    dlam, dg_in, d_tt = torch.zeros(R, H, L, **f32), torch.zeros(S, H, C, **f32), torch.zeros(S, H, C, C, **f32)
    d_kk2 = torch.empty_like(d_tt)
    d_o, d_qt, d_u, d_m = grads = [x.contiguous() for x in (d_o, d_qt, d_u, d_m)]
    KP = triton.next_power_of_2(K)
    BK, BV = min(TILE, KP), min(TILE, triton.next_power_of_2(V))
    tables = (layout.docs, layout.slot_doc, layout.slot_chunk, tree_rows)
    shape = dict(C=C, LOG_C=C.bit_length() - 1, BK=BK, BV=BV, PREC=prec, num_warps=num_warps(q.dtype))
    state_grad_kernel[(S * H * triton.cdiv(K, BK),)](k, v, g, beta, inv, d_u, d_m, dk_state, dg_in, d_tt, *tables, H,
                                                     Hk, K, V, C=C, BK=BK, BV=BV, SHARED=shared, PREC=prec,
                                                     num_warps=num_warps(q.dtype), num_stages=NUM_STAGES)
    pairs_grad_kernel[(S, H)](q, k, v, g, beta, lam, inv, pairs, d_o, d_qt, d_m, dbeta, dlam, dg_in, d_tt, d_kk2,
                              *tables, scale, H, Hk, K, V, L, KP=KP, num_stages=NUM_STAGES,
                              **{**shape, "BK": min(PAIRS_STEP, KP), "BV": min(PAIRS_STEP, triton.next_power_of_2(V)),
                                 "num_warps": PAIRS_WARPS})
    d_sg = d_tt  # pairs_grad replaced each tile
    tile_grad_kernel[(S * H * (triton.cdiv(V, BV) + triton.cdiv(K, BK)),)](
        q, k, v, g, beta, lam, inv, pairs, *grads, d_sg, d_kk2, dq, dk, dk_state, dv, dg_in, *tables, scale, H, Hk, K,
        V, L, SHARED=shared, num_stages=TILE_STAGES, **shape)
    decay_grad_kernel[(S, H)](dg_in, dg, *tables[:3], H, C=C)
    return dq, dk, dv, dg, dbeta, dlam
