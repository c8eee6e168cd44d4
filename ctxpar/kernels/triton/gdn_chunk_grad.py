"""GDN backward of stage 1 (mirror of gdn_chunk.py): the chunk stage's input gradients.

One program per (slot, head) takes the gradients of the chunk's outputs (intra output dO, Qt,
U, M; the tree's autograd produced the last three), loads the forward's N and applies the
chain rule backwards through it in registers, [C, C] and [C, K] tiles whole, the [K, V] and
[K, K] gradients dU, dM one tile at a time (V = 512 whole would not fit):

    o = (P * lam) V, P = S T, S = Q K^T * Gam     Qt = e^G Q - S W, W = T Kd, Kd = e^G K
    U = Kt^T T V, M = e^G_C I - Kt^T W, Kt = e^(G_C - G) K
    T = N diag(beta), N = (I + A)^-1, A = diag(beta) strict(K K^T * Gam)  ->  dA = -N^T dN N^T

Every dependence on the decays goes through dG (per position, then a reverse cumsum inside the
chunk: dg_r = sum over t >= r of dG_t); pairs inside Gam give row sum minus column sum of
dGam * Gam, and G_C (the last position) collects the chunk-end terms. Padded positions are zero
tokens: they contribute nothing and their gradients are not stored.

dq, dk: the heads of a q/k group add into one float32 buffer with atomics (as query_grad.py).
dlambda: the levels <= log2 C of this chunk's pairs; the tree's levels come from autograd.

On sm_90 (Triton 3.6) this kernel takes 255 registers and spills 2.7 KB a thread. Measured and
not kept (H200, 128K tokens): the tile loops' sums expanded into two accumulators, dO V^T (then
D = dP - sum dQt Kd^T) and E = sum dU V^T - sum dM Kd^T, so that dS = D T^T, dT = S^T D + Kt E,
dKt = T E^T after the loops, with the forward's terms recomputed there: 2.4 KB of spills, but
49.4 ms against this kernel's 36.4 at H=16, K=V=128 (42.2 with 8 warps and 32-wide tiles) and
59.6 against 48.3 at H=6, K=192, V=384 (benchmarks/results/2026-12-01-h200-gdn-session17-ab.json).
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, intra_decay, intra_scales, local_decay, local_levels, mma,
                                          num_warps, row_tile, slot_info)
from ctxpar.kernels.triton.gdn_chunk import qk_columns, square_tile

# No multi-buffered loads in the tile loops: a [K, 64] float32 tile of dM is 64 KB at K = 256, and
# three stages of it alone would nearly fill the shared memory; the loops run a few steps only.
NUM_STAGES = 1


def tile_width(k_dim: int, v_dim: int) -> int:
    """dU / dM tile width. Swept on an H200 at 128K tokens (bf16, 4 warps; 16 / 32 / 64 wide):
    36.5 / 42.6 / 48.7 ms at H=16, K=V=128, 57.7 / 48.4 ms at H=6, K=192, V=384, where 64-wide
    tiles need 256 KiB of shared memory, past the 227 KiB a block may take. 32-wide tiles fit at
    K = 256 (192 KiB, benchmarks/kernel_resources.py)."""
    return 16 if max(k_dim, v_dim) <= 128 else 32


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    return mma(a, b, tl.float32, PREC)


@triton.jit
def gdn_chunk_grad_kernel(q, k, v, g, beta, lam, inv, do, dqt, du, dm, dq, dk, dv, dg, dbeta, dlam, docs, slot_doc,
                          slot_chunk, tree_rows, H, HK, K, V, L, C: tl.constexpr, LOG_C: tl.constexpr, KP: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    group = h // (H // HK)
    r, rk = tl.arange(0, C), tl.arange(0, KP)
    head = (i * H + h).to(tl.int64)
    node = (tl.load(tree_rows + i) * H + h).to(tl.int64)  # dU, dM rows: as the forward's U, M
    qt, kt = qk_columns(q, k, rows, valid, HK, group, K, rk)
    gl = local_decay(g, rows, valid, H, h)
    bt = tl.load(beta + rows * H + h, mask=valid, other=0.0).to(tl.float32)
    total = tl.sum(tl.where(r == C - 1, gl, 0.0))

    # Forward quantities.
    inv = tl.load(square_tile(inv, i, h, H, C))
    ut = inv * bt[None, :]
    gam = intra_decay(gl, valid, C)
    s = dot(qt, tl.trans(kt), PREC) * gam
    e_in = tl.where(valid, tl.exp(gl), 0.0)
    e_out = tl.where(valid, tl.exp(total - gl), 0.0)
    k_out = kt * e_out[:, None]
    scales = intra_scales(lam, rows, valid, local_levels(C, LOG_C), H, h, L, C, LOG_C)
    p = dot(s, ut, PREC)

    # V tiles: the intra output and the chunk end state U = Kt^T (T V).
    dov = tl.zeros([C, C], dtype=tl.float32)
    d_t = tl.zeros([C, C], dtype=tl.float32)
    d_kout = tl.zeros([C, KP], dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BV)):
        rv = vb * BV + tl.arange(0, BV)
        vt = tl.load(row_tile(v, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
        vt = vt.to(tl.float32)
        d_o = tl.load(do + (head * C + r[:, None]) * V + rv[None, :], mask=rv[None, :] < V, other=0.0)
        d_u = tl.load(du + node * K * V + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & (rv[None, :] < V),
                      other=0.0)
        dov += dot(d_o, tl.trans(vt), PREC)
        k_du = dot(k_out, d_u, PREC)  # gradient of the pseudo-values T V
        d_t += dot(k_du, tl.trans(vt), PREC)
        d_kout += dot(dot(ut, vt, PREC), tl.trans(d_u), PREC)
        d_v = dot(tl.trans(p * scales), d_o, PREC) + dot(tl.trans(ut), k_du, PREC)
        tl.store(row_tile(dv, rows, H, h, V, rv), d_v, mask=valid[:, None] & (rv[None, :] < V))
    lev = local_levels(C, LOG_C)
    for level in tl.static_range(LOG_C + 1):
        tl.store(dlam + (rows * H + h) * L + level, tl.sum(tl.where(lev == level, dov * p, 0.0), 1),
                 mask=valid & (level < L))
    d_p = dov * scales
    d_s = dot(d_p, tl.trans(ut), PREC)
    d_t += dot(tl.trans(s), d_p, PREC)

    # K tiles: the transition M = e^G_C I - Kt^T W, the carried queries and W = T Kd. The
    # e^G scalings of Q and Kd go straight to dq, dk; their dG shares are summed per row.
    d_diag = tl.zeros([KP], dtype=tl.float32)
    d_g_in = tl.zeros([C], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        rc = kb * BK + tl.arange(0, BK)
        col_mask = valid[:, None] & (rc[None, :] < K)
        qc, kc = qk_columns(q, k, rows, valid, HK, group, K, rc)
        d_qc = tl.load(dqt + (head * C + r[:, None]) * K + rc[None, :], mask=rc[None, :] < K, other=0.0)
        d_mc = tl.load(dm + node * K * K + rk[:, None] * K + rc[None, :], mask=(rk[:, None] < K) & (rc[None, :] < K),
                       other=0.0)
        d_diag += tl.sum(tl.where(rk[:, None] == rc[None, :], d_mc, 0.0), 1)
        kd = kc * e_in[:, None]
        w = dot(ut, kd, PREC)
        d_w = -dot(tl.trans(s), d_qc, PREC) - dot(k_out, d_mc, PREC)
        d_s -= dot(d_qc, tl.trans(w), PREC)
        d_t += dot(d_w, tl.trans(kd), PREC)
        d_kout -= dot(w, tl.trans(d_mc), PREC)
        d_kd = dot(tl.trans(ut), d_w, PREC)
        d_g_in += e_in * tl.sum(qc * d_qc + kc * d_kd, 1)
        tl.atomic_add(row_tile(dq, rows, HK, group, K, rc), d_qc * e_in[:, None], mask=col_mask, sem="relaxed")
        tl.atomic_add(row_tile(dk, rows, HK, group, K, rc), d_kd * e_in[:, None], mask=col_mask, sem="relaxed")

    # Through the inverse: T = N diag(beta), N = (I + A)^-1.
    d_beta = tl.sum(inv * d_t, 0)
    d_a = -dot(dot(tl.trans(inv), d_t * bt[None, :], PREC), tl.trans(inv), PREC)
    d_a = tl.where(r[:, None] > r[None, :], d_a, 0.0)
    # q and k loaded again rather than kept from the start: the shared-memory copies of them that the
    # products below take (64 KB each at K = 256) would stay allocated through both tile loops (at
    # K = 192, V = 384: 352 KiB in all, 192 KiB this way).
    qt, kt = qk_columns(q, k, rows, valid, HK, group, K, rk)
    kk = dot(kt, tl.trans(kt), PREC)  # recomputed here, not kept live through the tile loops
    d_beta += tl.sum(d_a * kk * gam, 1)
    d_kk = bt[:, None] * d_a * gam
    d_sg = d_s * gam
    d_q = dot(d_sg, kt, PREC)
    d_k = dot(d_kk + tl.trans(d_kk), kt, PREC) + dot(tl.trans(d_sg), qt, PREC) + d_kout * e_out[:, None]

    # Decays: pairs (row sum - column sum of dGam * Gam), the in/out scalings, and G_C.
    z = bt[:, None] * d_a * kk * gam + d_s * s
    out_share = e_out * tl.sum(kt * d_kout, 1)
    d_gl = tl.sum(z, 1) - tl.sum(z, 0) + d_g_in - out_share
    d_gl += tl.where(r == C - 1, tl.exp(total) * tl.sum(d_diag) + tl.sum(out_share), 0.0)
    tl.store(dg + rows * H + h, tl.cumsum(d_gl, 0, reverse=True), mask=valid)
    tl.store(dbeta + rows * H + h, d_beta, mask=valid)
    qk_mask = valid[:, None] & (rk[None, :] < K)
    tl.atomic_add(row_tile(dq, rows, HK, group, K, rk), d_q, mask=qk_mask, sem="relaxed")
    tl.atomic_add(row_tile(dk, rows, HK, group, K, rk), d_k, mask=qk_mask, sem="relaxed")


def chunk_stage_grads(q, k, v, g, beta, lam, inv, d_o, d_qt, d_u, d_m, layout, prec, tree_rows):
    """Gradients of gdn_chunk.chunk_stage's outputs (float32; dU, dM at rows tree_rows, as U, M;
    inv its N) -> dq, dk [rows, Hk, K], dv [rows, H, V], dg, dbeta [rows, H], dlam [rows, H, L]
    (levels <= log2 C), all float32."""
    R, H, K, V, L = v.shape[0], v.shape[1], k.shape[2], v.shape[2], lam.shape[2]
    f32 = dict(device=v.device, dtype=torch.float32)
    dq, dk = torch.zeros(R, k.shape[1], K, **f32), torch.zeros(R, k.shape[1], K, **f32)
    dv, dg, dbeta = torch.empty(R, H, V, **f32), torch.empty(R, H, **f32), torch.empty(R, H, **f32)
    dlam = torch.zeros(R, H, L, **f32)
    grads = (x.contiguous() for x in (d_o, d_qt, d_u, d_m))
    KP, tile = triton.next_power_of_2(K), tile_width(K, V)
    gdn_chunk_grad_kernel[(layout.num_slots, H)](
        q, k, v, g, beta, lam, inv, *grads, dq, dk, dv, dg, dbeta, dlam, layout.docs, layout.slot_doc,
        layout.slot_chunk, tree_rows, H, k.shape[1], K, V, L, C=layout.chunk, LOG_C=layout.chunk.bit_length() - 1,
        KP=KP, BK=min(tile, KP), BV=min(tile, triton.next_power_of_2(V)), PREC=prec, num_warps=num_warps(q.dtype),
        num_stages=NUM_STAGES)
    return dq, dk, dv, dg, dbeta, dlam
