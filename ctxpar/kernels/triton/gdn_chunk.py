"""GDN stage 1 (counterpart: ``torch_chunked.chunk_stage`` + ``intra_output``): the UT transform.

Everything a chunk contributes on its own. With Gam[t,s] = exp(G_t - G_s) inside the chunk, a
first kernel (one program per slot and head) inverts N = (I + A)^-1, A = diag(beta) strict(K K^T *
Gam), in blocks of 16 rows as flash-linear-attention's solve_tril does: the diagonal blocks by
forward substitution (15 steps on 16 x 16 tiles), the blocks below them by products of blocks, and
stores it: the UT matrix is T = N diag(beta), and the inversion is serial enough that the programs
of the second kernel and the backward load N rather than each redo it. The C-step substitution
over [C, C] tiles it replaced took 2.9 ms of a 79.9 ms fwd+bwd step at 128K tokens (H=16,
K=V=128, bf16, on an H200: the profile in 2026-12-01-h200-gdn-session19-ab.json); the blocks
take 0.76 ms of 56.8, and the op went 61.4 -> 59.4 ms (H=6, K=192, V=384: 91.6 -> 90.9;
results/2026-12-02-h200-gdn-session20.json). The second kernel, one program per (slot, head, tile), computes

- a V tile (tile < cdiv(V, BV)): those columns of the chunk's end state U = Kt^T (T V),
  Kt = exp(G_C - G) K, and of the intra-chunk output ((Q K^T * Gam) T * lambda) V;
- a K tile: those columns of the chunk transition M = exp(G_C) I - Kt^T W and of the queries
  carried to the chunk start Qt = exp(G) Q - (Q K^T * Gam) W, with W = T (exp(G) K).

The queries are q times the op's scale, taken in here (and in the backward) rather than by a
scaled copy of q: S = (Q K^T) * scale * Gam with Q K^T exact in float32, and Qt's columns. The
copy (q * scale in q's dtype, which rounds it in bf16) and its backward's multiply took 0.50 ms of
48.87 in a profile at 128K tokens, H=16, K=V=128 on an H200; without them the op went 47.40 ->
46.95 ms and its peak 15.70 -> 15.20 GiB (H=6, K=192, V=384: 59.76 -> 59.23 ms;
results/2026-12-02-h200-gdn-session23.json).

Outputs are float32 (U and M only where asked, gdn_tree.gradient_dtype) but two: the intra output in token
rows [rows, H, V], where the reads add to it and store the op's output (no gather out of the slot
grid), in v's dtype, the output's: in float32 it was 1 GB written and read at 128K tokens, H=16,
V=128, and its gradient, the output's in bf16, was cast to float32 for the backward, which rounds
it to bf16 again (0.44 ms in a profile). The op on an H200 went 46.24 -> 45.22 ms (H=6, K=192,
V=384: 58.54 -> 57.31), o's bf16 error against float64 1.93e-3 -> 2.20e-3 (tests/precision_gdn.py;
the A/B's other changes leave the output's arithmetic as it was; results/2026-12-02-h200-gdn-session23.json);
Qt [S, H, C, K] (padded rows zero; in the tree copies' dtype, bf16 for half-precision inputs: the
reads round it so, and it is all they take of it: 1 GB written and read where 2 were at 128K
tokens, H=16, K=128, and the op on an H200 48.83 -> 48.40 ms, peak 16.20 -> 15.70 GiB; H=6, K=192,
V=384: 60.68 -> 60.32 ms; results/2026-12-02-h200-gdn-session22.json), N and
the pair weights P = (Q K^T * Gam) T [S, H, C, C] (kept for the backward, whose programs would each
recompute it) in the slot grid; U [S, H, K, V] and M [S, H, K, K] at row tree_rows[i] for slot i,
the up-sweep's height-0 order, so that they are its first nodes and transitions as they are
(reordering them copied both forward and backward: ~7 ms of a 198 ms step at 128K tokens, H = 16,
on an H200).
Products of float32 intermediates run as ieee float32 for float32 inputs; for half-precision
inputs those of U, M and Qt take mma_f32's operands (bf16 for bf16 inputs, as
flash-linear-attention's chunk kernels), those of the intra output tf32 (10 mantissa bits: in bf16,
P and (P * lam) V took o's error against float64 from 1.8e-3 to 3.1e-3, on the interpreter at
T = 256, chunk 64; U, M and Qt's took it to 1.85e-3), and the inverse's block products are always
ieee (N feeds everything after it); products of the inputs themselves
(Q K^T, K K^T, and the backward's dO V^T) run in the inputs' dtype, whose products are exact in
the float32 sums: the same values, at half the operands' bytes (H200, bf16, 128K tokens, fwd+bwd:
78.2 -> 77.6 ms at H=16, K=V=128; 112.4 -> 100.5 at H=6, K=192, V=384). Keeping P spared
tile_grad's programs S and P (76.5 and 101.5 ms), the height-0 copies the up-sweep's copy kernels
(77.2, 111.1), the token rows the gathers (74.3, 103.7; all 2026-12-01-h200-gdn-session19-ab2.json).
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, intra_decay, intra_scales, local_decay, local_levels, mma,
                                          mma_f32, num_warps, row_tile, slot_info, store_tile, tiles_adjacent,
                                          token_tile)
from ctxpar.kernels.triton.gdn_tree import float_tree, gradient_dtype

# Warps of the inverse's programs: its tiles are 16 x 16, one warp holds one at 8 values a thread,
# and more warps mostly repeat the same work (each computes the 16-row tensor-core products, and
# the substitution's loop is about 245 SASS instructions a step on each of 1, 2 or 4 warps).
# Compiled for sm_90 (Triton 3.6, bf16, K = 128), 1 / 2 / 4 warps issue about 9.2K / 15.3K /
# 26.5K instructions a program (loops at their trip counts) at 255 / 222 / 190 registers a thread
# (1 warp spills 8 bytes): one warp issues the fewest and keeps 8 programs an SM resident to 4
# and 2. Swept on an H200 at 8K tokens x 4 (bf16): 2 and 4 warps took the op from 9.98 to 10.07 and
# 10.24 ms at H=16, K=V=128 (H=6, K=192, V=384: 11.39 -> 11.43, 11.49;
# results/2026-12-02-h200-gdn-session25.json). The C-step substitution over
# [C, C] tiles this replaced was swept on an H200 at 128K tokens (bf16): 1 / 2 / 4 / 8 warps took
# 3.2 / 2.9 / 8.3 / 7.8 ms at H=16, K=128 and 3.2 / 1.2 / 3.1 / 4.6 ms at H=6, K=192.
INVERSE_WARPS = 1
BLOCK = tl.constexpr(16)  # rows of the inverse's diagonal blocks: the smallest tile tl.dot takes
# gdn_chunk_kernel's pipeline stages, Triton's default. Swept on an H200 at 8K tokens x 4 (bf16): 1 and 2
# took the op from 9.68 to 9.74 and 9.76 ms at H=16, K=V=128 (H=6, K=192, V=384: 11.14 -> 11.20,
# 11.21; results/2026-12-02-h200-gdn-session26.json, before the bf16 tree gradients).
CHUNK_STAGES = 3


@triton.jit
def last(x, N: tl.constexpr):
    """x[N - 1] of a [N] vector."""
    return tl.sum(tl.where(tl.arange(0, N) == N - 1, x, 0.0))


@triton.jit
def chunk_blocks(g, beta, c, token_start, t0, length, h, H, C: tl.constexpr):
    """The chunk's blocks of BLOCK rows, each (token rows, valid, G from the chunk start, beta),
    all [BLOCK]; block b is chunk c * NB + b of BLOCK rows."""
    NB: tl.constexpr = C // BLOCK
    blocks = ()
    end = 0.0  # G at the end of the blocks before
    for b in tl.static_range(NB):
        rows, valid = chunk_rows(c * NB + b, token_start, t0, length, BLOCK)
        gl = end + local_decay(g, rows, valid, H, h)
        end = last(gl, BLOCK)
        blocks += ((rows, valid, gl, tl.load(beta + rows * H + h, mask=valid, other=0.0).to(tl.float32)),)
    return blocks


@triton.jit
def lower_blocks(k, blocks, HK, group, K, NB: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr):
    """A = diag(beta) strict(K K^T * Gam) on and below the diagonal, as block rows of [BLOCK, BLOCK]
    float32 blocks (entry i: A_i0 .. A_ii); zero at padded positions. The k k^T products run in
    k's dtype over slices of BK columns: whole [BLOCK, KP] rows, the products' operands, stayed
    live across all of them (sm_90, one warp: 936 bytes of spills a thread at K = 192 and 24 at
    128; 8 with slices of 32)."""
    BK: tl.constexpr = min(32, KP)
    kk = ()
    for i in tl.static_range(NB):
        kk += ((tl.zeros([BLOCK, BLOCK], dtype=tl.float32),) * (i + 1),)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        ks = ()
        for i in tl.static_range(NB):
            ks += (token_tile(k, blocks[i][0], blocks[i][1], HK, group, K, cols),)
        step = ()
        for i in tl.static_range(NB):
            row = ()
            for j in tl.static_range(i + 1):
                row += (kk[i][j] + mma(ks[i], tl.trans(ks[j]), k.dtype.element_ty, PREC),)
            step += (row,)
        kk = step
    r = tl.arange(0, BLOCK)
    a = ()
    for i in tl.static_range(NB):
        _, valid_i, g_i, beta_i = blocks[i]
        row = ()
        for j in tl.static_range(i + 1):
            _, valid_j, g_j, _ = blocks[j]
            keep = valid_i[:, None] & valid_j[None, :]
            if i == j:
                keep = keep & (r[:, None] > r[None, :])
            gam = tl.exp(tl.where(keep, g_i[:, None] - g_j[None, :], 0.0))
            row += (tl.where(keep, beta_i[:, None] * kk[i][j] * gam, 0.0),)
        a += (row,)
    return a


@triton.jit
def diagonal_inverses(a, NB: tl.constexpr):
    """(I + A_ii)^-1 of the diagonal blocks of A's block rows a (lower_blocks), by substitution:
    row t of an inverse is e_t - A_ii[t, :] @ inverse, and rows before t are final when row t is
    built. One loop for all the blocks: their steps are independent. Row t of A_ii is read down
    column t of its transpose, a vector along the inverse's rows as the product takes it: no
    layout change inside the loop (sm_90, 1 warp: 348 -> 245 SASS instructions a step)."""
    r = tl.arange(0, BLOCK)
    at = ()
    inv = ()
    for i in tl.static_range(NB):
        at += (tl.trans(a[i][i]),)
        inv += (tl.where(r[:, None] == r[None, :], 1.0, 0.0),)
    for t in range(1, BLOCK):
        step = ()
        for i in tl.static_range(NB):
            a_t = tl.sum(tl.where(r[None, :] == t, at[i], 0.0), 1)
            row = tl.where(r == t, 1.0, 0.0) - tl.sum(a_t[:, None] * inv[i], 0)
            step += (tl.where(r[:, None] == t, row[None, :], inv[i]),)
        inv = step
    return inv


@triton.jit
def unit_inverse(a, NB: tl.constexpr):
    """N = (I + A)^-1 from A's block rows (lower_blocks), so that T = N diag(beta), as block rows
    (entry i: N_i0 .. N_ii): the diagonal blocks by substitution, the blocks below them from block
    row i of (I + A) N = I, N_ij = -N_ii sum_{m=j}^{i-1} A_im N_mj. These products are of float32
    values and run as exact float32 ('ieee'): N feeds everything after it, and they are small."""
    diag = diagonal_inverses(a, NB)
    inv = ()
    for i in tl.static_range(NB):
        row = ()
        for j in tl.static_range(i):
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for m in tl.static_range(j, i):
                acc = tl.dot(a[i][m], inv[m][j], acc, input_precision="ieee")
            row += (-tl.dot(diag[i], acc, input_precision="ieee"),)
        inv += (row + (diag[i],),)
    return inv


@triton.jit
def qk_columns(q, k, rows, valid, HK, group, K, cols):
    """Columns cols of the chunk's q and k rows (group's head), float32, padded rows and columns zero."""
    return (token_tile(q, rows, valid, HK, group, K, cols).to(tl.float32),
            token_tile(k, rows, valid, HK, group, K, cols).to(tl.float32))


@triton.jit
def chunk_grams(q, k, rows, valid, HK, group, K, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                WITH_KK: tl.constexpr):
    """Q K^T and, WITH_KK, K K^T (else zeros) [C, C] of the chunk's rows (group's head), float32,
    over slices of BK of K in the inputs' dtype (exact products): whole [C, K] rows of q and k
    no longer stay live beside a program's other products (gdn_chunk_kernel at K = 192, sm_90,
    Triton 3.6, bf16: 296 bytes of spills a thread with them)."""
    qk, kk = tl.zeros([C, C], dtype=tl.float32), tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        qs, ks = qk_columns(q, k, rows, valid, HK, group, K, k0 + tl.arange(0, BK))
        qk += mma(qs, tl.trans(ks), q.dtype.element_ty, PREC)
        if WITH_KK:
            kk += mma(ks, tl.trans(ks), k.dtype.element_ty, PREC)
    return qk, kk


@triton.jit
def square_block(ptr, i, h, H, C: tl.constexpr, N: tl.constexpr):
    """Pointers to the top-left [N, N] block of the [C, C] tile of slot i, head h of a [S, H, C, C]
    tensor."""
    r = tl.arange(0, N)
    return ptr + ((i * H + h).to(tl.int64) * C + r[:, None]) * C + r[None, :]


@triton.jit
def square_tile(ptr, i, h, H, C: tl.constexpr):
    """Pointers to the [C, C] tile of slot i, head h of a [S, H, C, C] tensor."""
    return square_block(ptr, i, h, H, C, C)


@triton.jit
def chunk_decays(g, beta, rows, valid, h, H, C: tl.constexpr):
    """The chunk's cumulative decays G [C] and G_C, and beta [C], float32."""
    gl = local_decay(g, rows, valid, H, h)
    return gl, last(gl, C), tl.load(beta + rows * H + h, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def unit_inverse_kernel(k, g, beta, inv_out, docs, slot_doc, slot_chunk, H, HK, K, C: tl.constexpr,
                        KP: tl.constexpr, PREC: tl.constexpr):
    """N of slot i, head h, stored whole (zeros above the diagonal). Sized for C = 64, 4 blocks: at
    C = 128 the 36 blocks of A live at once spill 6 KB a thread (sm_90, one warp)."""
    i, h = tl.program_id(0), tl.program_id(1)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    NB: tl.constexpr = C // BLOCK
    blocks = chunk_blocks(g, beta, c, token_start, t0, length, h, H, C)
    inv = unit_inverse(lower_blocks(k, blocks, HK, h // (H // HK), K, NB, KP, PREC), NB)
    corner = square_block(inv_out, i, h, H, C, BLOCK)
    for bi in tl.static_range(NB):
        for bj in tl.static_range(NB):
            x = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)  # above the diagonal
            if bj <= bi:
                x = inv[bi][bj]
            tl.store(corner + (bi * C + bj) * BLOCK, x)


@triton.jit
def gdn_chunk_kernel(q, k, v, g, beta, lam, inv, qt_out, u_out, m_out, o_out, p_out, u_copy, m_copy, docs,
                     slot_doc, slot_chunk, tree_rows, scale, H, HK, K, V, L, C: tl.constexpr, LOG_C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, FILLED: tl.constexpr, PREC: tl.constexpr):
    i, h, tile = tiles_adjacent(H, tl.cdiv(V, BV) + tl.cdiv(K, BK))
    DT: tl.constexpr = q.dtype.element_ty  # the products' operands (mma_f32)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    group = h // (H // HK)
    r = tl.arange(0, C)
    gl, total, bt = chunk_decays(g, beta, rows, valid, h, H, C)
    ut = tl.load(square_tile(inv, i, h, H, C)) * bt[None, :]
    scores = chunk_grams(q, k, rows, valid, HK, group, K, C, BK, PREC, False)[0] * (intra_decay(gl, valid, C) * scale)
    e_out = tl.where(valid, tl.exp(total - gl), 0.0)[:, None]  # Kt = e^(G_C - G) K: onto Kt's partners
    head = (i * H + h).to(tl.int64)
    node = (tl.load(tree_rows + i) * H + h).to(tl.int64)
    nv = tl.cdiv(V, BV)
    if tile < nv:
        rv = tile * BV + tl.arange(0, BV)
        vt = token_tile(v, rows, valid, H, h, V, rv)
        pseudo = mma_f32(ut, vt, DT, PREC) * e_out
        for k0 in range(0, K, BK):  # U = Kt^T (T V), BK rows at a time
            rk = k0 + tl.arange(0, BK)
            u = mma_f32(tl.trans(token_tile(k, rows, valid, HK, group, K, rk)), pseudo, DT, PREC)
            if FILLED:
                store_tile(u_out, node, K, V, rk, rv, u)
            store_tile(u_copy, node, K, V, rk, rv, u)
        pairs = mma(scores, ut, tl.float32, PREC)
        if tile == 0:
            tl.store(square_tile(p_out, i, h, H, C), pairs)
        pairs *= intra_scales(lam, rows, valid, local_levels(C, LOG_C), H, h, L, C, LOG_C)
        o = mma(pairs, vt.to(tl.float32), tl.float32, PREC)
        tl.store(row_tile(o_out, rows, H, h, V, rv), o.to(o_out.dtype.element_ty),
                 mask=valid[:, None] & (rv[None, :] < V))
    else:
        rc = (tile - nv) * BK + tl.arange(0, BK)
        decay_in = tl.where(valid, tl.exp(gl), 0.0)[:, None]
        qc, kc = qk_columns(q, k, rows, valid, HK, group, K, rc)
        w = mma_f32(ut, kc * decay_in, DT, PREC)
        q_start = qc * (decay_in * scale) - mma_f32(scores, w, DT, PREC)
        tl.store(qt_out + (head * C + r[:, None]) * K + rc[None, :], q_start.to(qt_out.dtype.element_ty),
                 mask=rc[None, :] < K)
        w *= e_out
        for k0 in range(0, K, BK):  # M = e^G_C I - Kt^T W, BK rows at a time
            rk = k0 + tl.arange(0, BK)
            m = mma_f32(tl.trans(token_tile(k, rows, valid, HK, group, K, rk)), w, DT, PREC)
            m = tl.where(rk[:, None] == rc[None, :], tl.exp(total), 0.0) - m
            if FILLED:
                store_tile(m_out, node, K, K, rk, rc, m)
            store_tile(m_copy, node, K, K, rk, rc, m)


def chunk_stage(q, k, v, g, beta, lam, scale, layout, prec, tree_rows, copies, filled):
    """q, k [rows, Hk, K] (q times ``scale`` is the query); v [rows, H, V]; g, beta [rows, H];
    lam [rows, H, L]; tree_rows [S] the row of each slot's U and M -> (o_intra [rows, H, V],
    Qt [S, H, C, K], U [S, H, K, V], M [S, H, K, K], N [S, H, C, C], P [S, H, C, C]), float32 but
    o_intra, in v's dtype, and Qt, in the dtype of the tree's copies (gdn_tree.tree_copies), the
    reads' operands. Also stores U and M at the same rows of those copies, whose height 0 they
    are. Unless ``filled``, U and M in float32 are stand-ins in the gradients' dtype: the copies
    alone hold them (gdn_tree.gradient_dtype)."""
    S, C = layout.num_slots, layout.chunk
    if C % BLOCK.value:
        raise ValueError(f"the GDN chunk stage inverts in blocks of {BLOCK.value} rows: chunk {C} is not a multiple")
    H, K, V, L = v.shape[1], k.shape[2], v.shape[2], lam.shape[2]
    f32 = dict(device=v.device, dtype=torch.float32)
    o, qt = torch.empty_like(v), torch.empty(S, H, C, K, device=v.device, dtype=copies[0].dtype)
    inv, grad_dtype = torch.empty(S, H, C, C, **f32), gradient_dtype(filled, copies[0].dtype)
    u, m = (float_tree(shape, filled, grad_dtype, v.device) for shape in ((S, H, K, V), (S, H, K, K)))
    pairs = torch.empty_like(inv)
    KP = triton.next_power_of_2(K)
    # V tiles of 128 (64 before): at K = V = 128 three programs a slot and head where there were
    # four, each loading q, k and N and taking Q K^T again; sm_90, Triton 3.6: 255 registers, 16
    # bytes of spills, 88 KiB of shared memory (64: 250, 8, 64 KiB). The op at 128K tokens on an
    # H200 47.40 -> 46.37 ms (H=6, K=192, V=384: 59.76 -> 58.22; results/2026-12-02-h200-gdn-session23.json).
    BK, BV = min(64, KP), min(128, triton.next_power_of_2(V))
    tables = (layout.docs, layout.slot_doc, layout.slot_chunk)
    unit_inverse_kernel[(S, H)](k, g, beta, inv, *tables, H, k.shape[1], K, C=C, KP=KP, PREC=prec,
                                num_warps=INVERSE_WARPS)
    # Uncapped: at 255 registers a thread two programs share an SM; capped for three (maxnreg 168,
    # 360 bytes of spills at K = V = 128) the op at 128K tokens went 61.4 -> 61.8 ms (H=16, bf16,
    # an H200; results/2026-12-02-h200-gdn-session20.json).
    grid = (S * H * (triton.cdiv(V, BV) + triton.cdiv(K, BK)),)
    gdn_chunk_kernel[grid](q, k, v, g, beta, lam, inv, qt, u, m, o, pairs, *copies, *tables, tree_rows,
                           scale, H, k.shape[1], K, V, L, C=C, LOG_C=C.bit_length() - 1, BK=BK, BV=BV,
                           FILLED=filled, PREC=prec,
                           num_warps=num_warps(q.dtype), num_stages=CHUNK_STAGES)
    return o, qt, u, m, inv, pairs
