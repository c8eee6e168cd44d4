"""Backward stage 1 (mirror of the node reads): the gradient of every read tree node.

Node ((c >> h) - 1, h) is read by the 2^h chunks of its right sibling, so its gradient is
sum over their tokens t of lam_t[log2 C + 1 + h] exp(G_t - G_node_end) q_t do_t^T. A program owns
an aligned group of GROUP chunks of one document, one head and one K x V tile: for each height it
sums the group's readers of a node in registers and adds the sum to the node (slot or initial
node) with one atomic add per node and group; nodes above the group collect one add per group.
"""

import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (chunk_rows, gc_before, level_scale, local_decay, mma_f32, node_carry, row_tile,
                                          state_offsets)

NUM_WARPS = 8  # the dots and [C, K] fp32 tiles of one program need the registers of 8 warps


@triton.jit
def node_grad_kernel(q, do, g, lam, gc, grads, init_grads, docs, groups, heights, H, HK, K, V, L, NI,
                     C: tl.constexpr, LOG_C: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, PREC: tl.constexpr, HAS_INIT: tl.constexpr):
    gi, h, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(groups + gi * 2)
    first_chunk = tl.load(groups + gi * 2 + 1) * GROUP
    row = docs + n * 6
    token_start, t0, length = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    c0, c_last, first = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
    rk = tile // tl.cdiv(V, BV) * BK + tl.arange(0, BK)
    rv = tile % tl.cdiv(V, BV) * BV + tl.arange(0, BV)
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    group = h // (H // HK)
    for height in range(0, heights):
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for r in range(GROUP):
            c = first_chunk + r
            if (c >= c0) & (c <= c_last) & (((c >> height) & 1) == 1):
                i = first + c - c0
                rows, valid = chunk_rows(c, token_start, t0, length, C)
                gl = local_decay(g, rows, valid, H, h)
                in_slots, slot, carry = node_carry(gc, gl, gc_before(gc, i, c, c0, H, h), c, height, c0, first, H, h)
                weight = level_scale(lam, rows, valid, H, h, L, LOG_C + 1 + height) * carry
                qt = tl.load(row_tile(q, rows, HK, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
                dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
                acc += mma_f32(tl.trans(qt * weight[:, None]), dot_, q.dtype.element_ty, PREC)
                if (((c + 1) & ((1 << height) - 1)) == 0) | (r == GROUP - 1) | (c == c_last):
                    o_slot, o_init = state_offsets(slot, n, h, height, H, NI, K, V, rk, rv)
                    tl.atomic_add(grads + o_slot, acc, mask=mask & in_slots)
                    if HAS_INIT:
                        tl.atomic_add(init_grads + o_init, acc, mask=mask & (in_slots == 0))
                    acc = tl.zeros([BK, BV], dtype=tl.float32)


def node_grads(q, do, g, lam, gc, grads, init_grads, layout, prec):
    """Adds into grads [S, H, K, V] (and init_grads [N, H, NI, K, V]) the read nodes' gradients."""
    H, K, V, L = do.shape[1], q.shape[2], do.shape[2], lam.shape[2]
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    grid = (layout.groups.shape[0], H, triton.cdiv(K, BK) * triton.cdiv(V, BV))
    node_grad_kernel[grid](q, do, g, lam, gc, grads, grads if init_grads is None else init_grads, layout.docs,
                           layout.groups, layout.heights, H, q.shape[1], K, V, L,
                           1 if init_grads is None else init_grads.shape[2], C=layout.chunk,
                           LOG_C=layout.chunk.bit_length() - 1, GROUP=layout.group_size, BK=BK, BV=BV,
                           num_warps=NUM_WARPS, PREC=prec, HAS_INIT=init_grads is not None)
