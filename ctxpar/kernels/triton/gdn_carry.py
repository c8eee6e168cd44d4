"""GDN stage 3 (counterpart: ``torch_chunked.read_tree``): every chunk's reads of tree nodes, by
carrying the chunk's queries rather than the nodes.

Chunk c reads, at each set bit h of c (lowest first), the node B_h of the block that ends where
the block of the previous read begins, carried to c's start through the transitions T of the
blocks read before it: o += lambda_h Qt T_h1 ... T_h' B_h. One program per (slot, head) walks its
bits with Q = Qt, o += lambda_h Q @ B_h, Q = Q @ T_h: C K (K + V) multiply-adds a read and no
carried node is ever written (the node-side carry, K K V a read gathered into per-height pools,
took 29 of a 187 ms step forward at 128K tokens, H=16, K=V=128, and 77 backward). Initial-state
nodes are carried to t0 already: their transition is the identity.

The operands are one copy of the tree - its nodes by slot (every node a chunk reads is its slot's
top one, gdn_tree.py), its transitions joined over heights (``TreePlan.node_offsets``) - in bf16 for
half-precision inputs (the products run on bf16 tensor cores, float32 accumulation; Q is rounded
before each product as the tree is) and float32 otherwise.

Backward, two kernels:
- chain_grad, per (slot, head): dQ down the bits: dQ_h = lambda_h dO B_h^T + dQ_h+ T_h^T, the
  dQ_h+ entering each read kept; dQt = the last dQ; lambda's gradient rowsum(Q * dO B_h^T) from
  the same product, Q each read's, which the forward's reads kept (``TreePlan.read_row``);
- node_grad, per (run of a node's readers, head, tile): dB += Q^T (lambda dO) and dT += Q^T dQ_h+
  over the run (a node's readers are consecutive chunks, layout.node_segments), stored where the
  run is all of them, else added atomically.
Both read dO from the op's output rows in its dtype, once for each read of the token's chunk:
bf16 halves that traffic against float32.
The kept Q and dQ_h+ are [reads, H, C, K] each in the operands' dtype (reads: the set bits of
every chunk index; 2 x 2.9 GB at 128K tokens, H=16, K=128, bf16). The tree's copies are the
up-sweep's (gdn_tree.UpSweep), kept for both backwards in place of the float32 tree.

Designs measured before this one (H200, bf16, H=16, K=V=128, 128K tokens; the scripts are in the
history of benchmarks/exp_gdn_query_carry.py and exp_gdn_height_scan.py, their figures in
results/2026-12-01-h200-exp-gdn-*.json): the node-side carry (29.1 ms forward, 105.8 fwd+bwd);
this design with float32 operands in tf32 and Q, dQ kept in float32 (19.6, 81.2); one delta-rule
scan per height, A <- M_c A + U_c with U taken while the height's bit is clear (forward 21.2
against the up-sweep's 7.55 + the node-side reads' 29.3; its backward must sum dM_c over every
height, 46 GB of float32 atomic adds at 128K if each height's program adds its own).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import chunk_rows, doc_info, node_at, reads_at, row_tile, slot_info, token_tile

# Swept on an H200 at 128K tokens (bf16, H=16, K=V=128; the reads' fwd+bwd): chain_grad with one
# stage 24.7 ms, three 29.7 (two programs per SM where three stages' buffers left one); 8 warps
# 29.0, registers capped at 168 28.2; node_grad's 128-wide tiles 21.8 (64: 24.6, 32: 39.2; 8 warps
# 23.1) (results/2026-12-01-h200-sweep-gdn-carry.json). The reads and node_grad capped for three
# programs an SM (maxnreg 168; 250-254 registers, two, uncapped) took the op at 128K tokens from
# 61.4 to 62.7 ms (results/2026-12-02-h200-gdn-session20.json).
CHAIN_STAGES = 1
# Where K pads past 128 (K = 192) chain_grad takes two stages. Swept alone on an H200 at 8K tokens x 4
# (bf16): the op 11.39 -> 11.29 ms at H=6, K=192, V=384, but 9.98 -> 10.14 at H=16, K=V=128; on top
# of gdn_chunk_grad's two stages and 4 pairs warps, at both shapes: 11.21 -> 11.08 ms at H=6 (128K
# tokens 50.67 -> 50.28), 9.68 -> 9.84 at H=16. With K past 128 only, against one stage everywhere
# and gdn_chunk_grad's settings before, in one lease: 11.40 -> 11.12 ms at H=6 (FLA's chunk_gated_delta_rule
# 4.45), 10.00 -> 9.69 at H=16 (results/2026-12-02-h200-gdn-session25.json).
WIDE_CHAIN_STAGES = 2
# The reads' and node_grad's pipeline stages, Triton's default. Swept on an H200 at 8K tokens x 4 (bf16),
# the op at H=16, K=V=128 and H=6, K=192, V=384 from 9.68 and 11.14 ms: reads 1 / 2 9.70 / 9.68 and
# 11.10 / 11.13; node_grad 1 / 2 9.74 / 9.69 and 11.28 / 11.15 (results/2026-12-02-h200-gdn-session26.json,
# before the bf16 tree gradients).
READ_STAGES = NODE_STAGES = 3
# node_grad's N tile; its K tile is the whole padded K (two 128-wide tiles at K = 192, the second
# half empty, loaded dO and the kept dQ twice a run): the op at H=6, K=192, V=384 on an H200 from
# 248.3 to 236.6 ms at 512K tokens, 56.41 to 54.13 at 128K (sm_90, Triton 3.6, bf16, 8 warps: 230
# registers, no spills, 96 KiB shared, against 174 and 64; results/2026-12-02-h200-gdn-session24.json).
NODE_TILE = 128


def wide(K: int) -> bool:
    """K pads past 128 (K = 192 to 256), where the carry kernels take other launch settings."""
    return triton.next_power_of_2(K) > 128


def carry_warps(K: int) -> int:
    """Warps of the reads, chain_grad and node_grad: 4, as swept above at K = 128 (8 took the op
    from 91.1 to 95.9 ms there); 8 where K pads to 256 (K = 192), where at 4 the reads and chain_grad
    spill 0.8 and 1.6 KB a thread on sm_90 and the op (H=6, K=192, V=384, 128K tokens) took 159.4 ms
    against 149.1 at 8 (results/2026-12-01-h200-gdn-session18-configs.json)."""
    return 8 if wide(K) else 4


@triton.jit
def tree_items(offsets, rank, height, slot, in_slots, H, h):
    """(row of the nodes by slot, row of the joined transitions) of slot's node of ``height``,
    times H plus the head; 0 for an initial node (heights past the tree's own are only those)."""
    row = tl.load(rank + slot, mask=in_slots, other=0)
    return row * H + h, (tl.load(offsets + height, mask=in_slots, other=0) + row) * H + h


@triton.jit
def node_tile(nodes, init, item, in_slots, n, h, height, H, NI, K, V, rk, rv, HAS_INIT: tl.constexpr):
    """[KP, BV] tile of the read node: a slot's, or the initial state's (zero past its heights)."""
    tile = rk[:, None] * V + rv[None, :]
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    x = tl.load(nodes + item.to(tl.int64) * K * V + tile, mask=mask & in_slots, other=0.0)
    if HAS_INIT:
        o_init = ((n * H + h) * NI + height).to(tl.int64) * K * V
        x += tl.load(init + o_init + tile, mask=mask & (in_slots == 0) & (height < NI), other=0.0)
    return x


@triton.jit
def carries(c, height, in_slots):
    """The read at ``height`` carries Q on: its block is a slot and a higher bit of c is set."""
    return in_slots & ((c >> (height + 1)) != 0)


@triton.jit
def square(ptr, item, K, rk):
    return tl.load(ptr + (item.to(tl.int64) * K + rk[:, None]) * K + rk[None, :],
                   mask=(rk[:, None] < K) & (rk[None, :] < K), other=0.0)


@triton.jit
def rows_of(ptr, item, K, rc, rk):
    """Pointers to the [C, KP] rows of ``item`` in a [items, C, K] tensor."""
    return ptr + (item.to(tl.int64) * rc.shape[0] + rc[:, None]) * K + rk[None, :]


@triton.jit
def reads_kernel(o, qt, lam, lam_s0, lam_s1, lam_s2, nodes, trans, init, offsets, rank, read_row, docs, slot_doc,
                 slot_chunk, out, qs, H, K, V, NI, heights, LEVEL0, C: tl.constexpr, KP: tl.constexpr,
                 BV: tl.constexpr, HAS_INIT: tl.constexpr, KEEP_Q: tl.constexpr, CARRY_FIRST: tl.constexpr,
                 PREC: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    n, c, token_start, t0, length, c0, _, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    rc, rk = tl.arange(0, C), tl.arange(0, KP)
    ck = rk[None, :] < K
    q = tl.load(rows_of(qt, i * H + h, K, rc, rk), mask=ck, other=0.0)  # in the nodes' dtype
    if CARRY_FIRST:  # V past one tile: Q down all the bits once, each read's kept in qs, for every V tile
        for height in range(0, heights):
            if reads_at(c, height, c0, HAS_INIT):
                tl.store(rows_of(qs, tl.load(read_row + i * heights + height) * H + h, K, rc, rk), q, mask=ck)
                in_slots, slot = node_at(c, height, c0, first)
                if carries(c, height, in_slots):
                    _, trans_item = tree_items(offsets, rank, height, slot, in_slots, H, h)
                    q = tl.dot(q, square(trans, trans_item, K, rk), input_precision=PREC).to(q.dtype)
        tl.debug_barrier()  # the kept rows, stored by the program's other threads, are read below
    for v0 in range(0, V if CARRY_FIRST else 1, BV):  # every V tile, or the one there is
        rv = v0 + tl.arange(0, BV)
        tile_mask = valid[:, None] & (rv[None, :] < V)
        acc = tl.load(row_tile(o, rows, H, h, V, rv), mask=tile_mask, other=0.0).to(tl.float32)
        qj = q
        for height in range(0, heights):
            if reads_at(c, height, c0, HAS_INIT):
                kept = rows_of(qs, tl.load(read_row + i * heights + height) * H + h, K, rc, rk)
                if CARRY_FIRST:
                    qj = tl.load(kept, mask=ck, other=0.0)
                elif KEEP_Q:  # each read's Q, kept for the backward
                    tl.store(kept, qj, mask=ck)
                in_slots, slot = node_at(c, height, c0, first)
                item, trans_item = tree_items(offsets, rank, height, slot, in_slots, H, h)
                node = node_tile(nodes, init, item, in_slots, n, h, height, H, NI, K, V, rk, rv, HAS_INIT)
                w = tl.load(lam + i * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)
                acc += w[:, None] * tl.dot(qj, node, input_precision=PREC)
                if not CARRY_FIRST and carries(c, height, in_slots):
                    qj = tl.dot(qj, square(trans, trans_item, K, rk), input_precision=PREC).to(qj.dtype)
        tl.store(row_tile(out, rows, H, h, V, rv), acc.to(out.dtype.element_ty), mask=tile_mask)


@triton.jit
def chain_grad_kernel(d_out, lam, lam_s0, lam_s1, lam_s2, nodes, trans, init, offsets, rank, read_row, docs,
                      slot_doc, slot_chunk, qs, dqs, d_qt, d_lam, dl_s0, dl_s1, dl_s2, H, K, V, NI, heights, LEVEL0,
                      C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                      PREC: tl.constexpr, WHOLE_V: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    n, c, token_start, t0, length, c0, _, first = slot_info(docs, slot_doc, slot_chunk, i)
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    rc, rk = tl.arange(0, C), tl.arange(0, KP)
    ck = rk[None, :] < K
    half = nodes.dtype.element_ty
    dq = tl.zeros([C, KP], dtype=tl.float32)
    # One V step: dO's rows loaded once for all the reads (each read loaded them before): sm_90,
    # Triton 3.6, K = V = 128: spills 152 -> 16 bytes a thread; the op at 128K tokens on an H200
    # 46.24 -> 45.41 ms (results/2026-12-02-h200-gdn-session23.json).
    if WHOLE_V:
        do_rows = token_tile(d_out, rows, valid, H, h, V, tl.arange(0, BV))
    for step in range(0, heights):
        height = heights - 1 - step
        if reads_at(c, height, c0, HAS_INIT):
            row = tl.load(read_row + i * heights + height) * H + h
            tl.store(rows_of(dqs, row, K, rc, rk), dq.to(half), mask=ck)
            in_slots, slot = node_at(c, height, c0, first)
            item, trans_item = tree_items(offsets, rank, height, slot, in_slots, H, h)
            if carries(c, height, in_slots):
                dq = tl.dot(dq.to(half), tl.trans(square(trans, trans_item, K, rk)), input_precision=PREC)
            # dO B^T over V tiles: dQ's share and, against the kept Q, lambda's gradient
            dq_read = tl.zeros([C, KP], dtype=tl.float32)
            for v0 in range(0, V, BV):
                rv = v0 + tl.arange(0, BV)
                node = node_tile(nodes, init, item, in_slots, n, h, height, H, NI, K, V, rk, rv, HAS_INIT)
                do = do_rows if WHOLE_V else token_tile(d_out, rows, valid, H, h, V, rv)
                dq_read += tl.dot(do.to(half), tl.trans(node), input_precision=PREC)
            qj = tl.load(rows_of(qs, row, K, rc, rk), mask=ck, other=0.0).to(tl.float32)
            tl.store(d_lam + i * dl_s0 + h * dl_s1 + rc * dl_s2 + LEVEL0 + height, tl.sum(qj * dq_read, 1))
            dq += tl.load(lam + i * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)[:, None] * dq_read
    tl.store(rows_of(d_qt, i * H + h, K, rc, rk), dq.to(half), mask=ck)


@triton.jit
def node_grad_kernel(qs, partner, lam, lam_s0, lam_s1, lam_s2, read_row, segments, docs, offsets, rank, grads,
                     init_grads, H, K, N, NI, heights, LEVEL0, C: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                     SEGMENT: tl.constexpr, OF_TRANS: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    """dB (partner = dO [rows, H, N], weighed by lambda; into the nodes' gradients by slot) or,
    OF_TRANS, dT (partner = the kept dQ_h+ [reads, H, C, N]; into the joined transitions') of one
    run of a node's readers, one [BK, BN] tile."""
    s, h, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg = segments + s * 4
    n, height, c_first, count = tl.load(seg), tl.load(seg + 1), tl.load(seg + 2), tl.load(seg + 3)
    token_start, t0, length, c0, _, first = doc_info(docs, n)
    rc = tl.arange(0, C)
    rk = tile // tl.cdiv(N, BN) * BK + tl.arange(0, BK)
    rn = tile % tl.cdiv(N, BN) * BN + tl.arange(0, BN)
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for j in range(0, count):
        c = c_first + j
        i = first + c - c0
        row = tl.load(read_row + i * heights + height) * H + h
        qj = tl.load(rows_of(qs, row, K, rc, rk), mask=rk[None, :] < K, other=0.0)
        if OF_TRANS:
            b = tl.load(rows_of(partner, row, N, rc, rn), mask=rn[None, :] < N, other=0.0)
        else:
            rows, valid = chunk_rows(c, token_start, t0, length, C)
            w = tl.load(lam + i * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)
            do = token_tile(partner, rows, valid, H, h, N, rn)
            b = (w[:, None] * do).to(qj.dtype)
        acc += tl.dot(tl.trans(qj), b, input_precision=PREC)
    in_slots, slot = node_at(c_first, height, c0, first)
    tile_off = rk[:, None] * N + rn[None, :]
    node_item, trans_item = tree_items(offsets, rank, height, slot, in_slots, H, h)
    item = (trans_item if OF_TRANS else node_item).to(tl.int64)
    o_init = ((n * H + h) * NI + height).to(tl.int64) * K * N
    out = tl.where(in_slots, grads + item * K * N + tile_off, init_grads + o_init + tile_off)
    mask = (rk[:, None] < K) & (rn[None, :] < N) & (in_slots | HAS_INIT)
    if (1 << height) > SEGMENT:  # the node's readers span several runs
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc, mask=mask)


def node_grads(qs, dqs, d_out, lam_slots, plan, log_c, prec, d_nodes, d_trans, d_init):
    """dB into d_nodes (by slot) and dT into d_trans (the joined transitions; initial nodes' dB into
    d_init, zeroed, or None): stored where one program is a node's only writer, so only
    plan.zero_ranges need zeros before (not the right children's transitions either, about half
    the rows, which no chunk reads and the up-sweep's backward stores). At 128K tokens, H=16,
    K=V=128 on an H200 the step's fills went from 2.6 to 1.5 ms when only the rows with one writer
    were left out (8.6 GB filled before, both buffers whole, every height's nodes)."""
    layout, (_, H, C, K) = plan.layout, qs.shape
    has_init = d_init is not None
    NI = 1 if d_init is None else d_init.shape[2]
    # Without an initial state the runs reading initial nodes (the last ones) add nothing.
    count = layout.segments.shape[0] if has_init else layout.segments_in_slots
    for of_trans, partner, grads, N, runs in ((False, d_out, d_nodes, d_nodes.shape[-1], count),
                                               (True, dqs, d_trans, K, layout.segments_in_slots)):
        BK, BN = triton.next_power_of_2(K), min(triton.next_power_of_2(N), NODE_TILE)
        if runs:
            node_grad_kernel[(runs, H, triton.cdiv(K, BK) * triton.cdiv(N, BN))](
                qs, partner, lam_slots, *lam_slots.stride()[:3], plan.read_row, layout.segments, layout.docs,
                plan.node_offsets, plan.rank, grads, grads if d_init is None else d_init, H, K, N, NI,
                layout.heights, log_c + 1, C=C, BK=BK, BN=BN, SEGMENT=layout.segment, OF_TRANS=of_trans,
                HAS_INIT=has_init, PREC=prec, num_warps=carry_warps(K), num_stages=NODE_STAGES)


def _tiles(K, V):
    """(K padded, the reads' V tile, chain_grad's V step): chain_grad holds a [K, K] transition
    beside each [K, V step] node tile, so its step narrows as K grows (sm_90: 256 KiB of shared
    memory at K = 256 with a 128-wide step, over the 227 KiB a block may take)."""
    KP = triton.next_power_of_2(K)
    return KP, min(triton.next_power_of_2(V), 128), min(triton.next_power_of_2(V), 16384 // KP)


class CarryReads(torch.autograd.Function):
    """o [rows, H, V] (the chunk stage's output, in the output's dtype), qt [S, H, C, K] (in the
    copies' dtype, as its gradient), lam_slots [S, H, C, L'], init [N, H, NI, K, V] or None, the
    up-sweep's copies (gdn_tree.up_sweep), the output's dtype, then the up-sweep's nodes (by slot)
    and trans[0..] -> o plus the reads of every height, [rows, H, V] in that dtype: the op's
    output, with no gather or cast after. Taking o in spares an add; o's gradient is the output's."""

    @staticmethod
    def forward(ctx, o, qt, lam_slots, init, plan, log_c, prec, copies, dtype, *tree):
        node_ops, trans_ops, init_ops = copies
        S, H, C, K = qt.shape
        V = node_ops.shape[-1]
        KP, BV, _ = _tiles(K, V)
        out = o.new_empty(o.shape, dtype=dtype)
        keep = any(ctx.needs_input_grad)  # no backward to come (no_grad, inference): nothing to keep
        # Where V takes several V tiles (K = 192, V = 384: three), a program per V tile carried Q
        # again (Q T at K padded to 256) and loaded every transition: one program per (slot, head)
        # carrying Q first took the op (H200, H=6) from 248.3 to 236.4 ms at 512K tokens, 56.41
        # to 54.43 at 128K (results/2026-12-02-h200-gdn-session24.json). It keeps the Q's without a
        # backward to come too.
        carry_first = triton.cdiv(V, BV) > 1
        qs = qt.new_empty(plan.num_reads if keep or carry_first else 0, H, C, K, dtype=node_ops.dtype)
        layout = plan.layout
        reads_kernel[(S, H)](
            o.contiguous(), qt, lam_slots, *lam_slots.stride()[:3], node_ops, trans_ops,
            node_ops if init is None else init_ops, plan.node_offsets, plan.rank, plan.read_row, layout.docs,
            layout.slot_doc, layout.slot_chunk, out, qs, H, K, V, 1 if init is None else init.shape[2],
            layout.heights, log_c + 1, C=C, KP=KP, BV=BV, HAS_INIT=init is not None, KEEP_Q=keep,
            CARRY_FIRST=carry_first, PREC=prec, num_warps=carry_warps(K), num_stages=READ_STAGES)
        # The float32 tree comes in for its gradients only: the kernels read the up-sweep's copies,
        # which its backward keeps too (one storage), and nothing keeps the float32 heights. The
        # carried queries are kept instead of qt: the backward would make them again (at 128K tokens,
        # H=16, K=128: 2.9 GB, which the backward held anyway).
        ctx.save_for_backward(lam_slots, init, node_ops, trans_ops, init_ops, qs)
        ctx.plan, ctx.log_c, ctx.prec = plan, log_c, prec
        ctx.qt_shape, ctx.grad_dtype = qt.shape, tree[0].dtype  # gdn_tree.gradient_dtype
        return out

    @staticmethod
    def backward(ctx, d_out):
        lam_slots, init, node_ops, trans_ops, init_ops, qs = ctx.saved_tensors
        plan, log_c, prec = ctx.plan, ctx.log_c, ctx.prec
        layout = plan.layout
        S, H, C, K = ctx.qt_shape
        V = node_ops.shape[-1]
        KP, _, BV = _tiles(K, V)
        NI = 1 if init is None else init.shape[2]
        has_init = init is not None
        d_out = d_out.contiguous()
        dqs = torch.empty_like(qs)
        d_qt, d_lam = qs.new_empty(S, H, C, K), torch.zeros_like(lam_slots)
        chain_grad_kernel[(S, H)](
            d_out, lam_slots, *lam_slots.stride()[:3], node_ops, trans_ops,
            node_ops if init_ops is None else init_ops, plan.node_offsets, plan.rank, plan.read_row, layout.docs,
            layout.slot_doc, layout.slot_chunk, qs, dqs, d_qt, d_lam, *d_lam.stride()[:3], H, K, V, NI,
            layout.heights, log_c + 1, C=C, KP=KP, BV=BV, HAS_INIT=has_init, PREC=prec, WHOLE_V=V <= BV,
            num_warps=carry_warps(K), num_stages=WIDE_CHAIN_STAGES if wide(K) else CHAIN_STAGES)
        d_nodes, d_trans = (torch.empty(x.shape, device=d_out.device, dtype=ctx.grad_dtype)
                            for x in (node_ops, trans_ops))
        for grads, ranges in zip((d_nodes, d_trans), plan.zero_ranges):
            for lo, hi in ranges:
                grads[lo:hi] = 0
        d_init = None if init is None else torch.zeros_like(init)
        node_grads(qs, dqs, d_out, lam_slots, plan, log_c, prec, d_nodes, d_trans, d_init)
        return (d_out, d_qt, d_lam, d_init, None, None, None, None, None, d_nodes, *d_trans.split(plan.sizes))
