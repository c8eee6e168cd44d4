"""Stage 1 (counterpart: ``torch_chunked.chunk_stage``'s U, then the first height of
``build_tree``): each chunk's end state, with the up-sweep's height 0 folded in.

U_c = sum_{s in c} exp(G_last - G_s) k_s v_s^T, one program per (slot, head, K x V tile). An odd
chunk whose left sibling c - 1 belongs to the same document stores the pair's node instead,
U_c + exp(G_c) U_{c-1}; its program also computes and stores U_{c-1}, and the sibling's program
does nothing. The separate height-0 launch of tree.up_sweep read and rewrote half of all slots
(the [S, H, K, V] float32 buffer is 2 GiB at 128K tokens). The program of tile 0 also writes the
chunk's total log decay, from which the caller takes the chunk-level cumulative decays.

Folding height 1 as well (the last chunk's program of each aligned block of four writing U, pair,
U and the block's node, one tile carried) was no faster with the up-sweep after it: on an H200
(bf16, H=32, K=128, Hk=1, V=64) 0.551 ms for both at 4K x 8 and 2.50 against 2.46 at 128K, at
128 registers (176 bytes of spills; 190 registers uncapped: 0.62 and 2.86).

With bf16 inputs the stage also writes the bf16 copy of the tree that the node readers take
(see ``chunk_states``): the nodes it stores that the up-sweep leaves as they are.
"""

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import (SCAN_BLOCK, chunk_rows, local_decay, mma_f32, register_cap, row_tile,
                                          slot_info)


@triton.jit
def chunk_state_kernel(k, v, g, docs, slot_doc, slot_chunk, states, copy, totals, H, HK, K, V,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                       COPY: tl.constexpr):
    i, h, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kb, vb = tile // tl.cdiv(V, BV), tile % tl.cdiv(V, BV)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, i)
    rk = kb * BK + tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    if ((c & 1) == 1) | (c == c_last):  # an even chunk with a right sibling: the sibling's program writes it
        u, total = end_state(k, v, g, c, token_start, t0, length, H, HK, h, K, V, rk, rv, C, PREC)
        end = (t0 + length) // C  # the chunk the document's end position lies in
        if ((c & 1) == 1) & (c > c0):
            left, last = end_state(k, v, g, c - 1, token_start, t0, length, H, HK, h, K, V, rk, rv, C, PREC)
            store_state(states, copy, totals, i - 1, h, left, last, tile, c - 1, c0, end, H, K, V, rk, rv, COPY)
            u += tl.exp(total) * left
        store_state(states, copy, totals, i, h, u, total, tile, c, c0, end, H, K, V, rk, rv, COPY)


@triton.jit
def end_state(k, v, g, c, token_start, t0, length, H, HK, h, K, V, rk, rv, C: tl.constexpr, PREC: tl.constexpr):
    """(U_c tile, total log decay of chunk c)."""
    rows, valid = chunk_rows(c, token_start, t0, length, C)
    gl = local_decay(g, rows, valid, H, h)
    total = tl.sum(tl.where(tl.arange(0, C) == C - 1, gl, 0.0))
    group = h // (H // HK)
    kt = tl.load(row_tile(k, rows, HK, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
    vt = tl.load(row_tile(v, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
    kd = kt.to(tl.float32) * tl.exp(total - gl)[:, None]
    return mma_f32(tl.trans(kd), vt, k.dtype.element_ty, PREC), total


@triton.jit
def store_state(states, copy, totals, i, h, u, total, tile, c, c0, end, H, K, V, rk, rv, COPY: tl.constexpr):
    """Slot i's node, chunk c's: an even chunk's U_c (height 0) or an odd chunk's pair node.

    With the bf16 copy, the copy where the up-sweep leaves the node as it is (an even chunk, or a
    pair whose bit 1 is clear), and the float32 node only where it is read again. An even chunk's
    is no up-sweep child (its pair node is built here) and the readers take the copy: it is read
    only as the node of a final state (ending before chunk ``end``) or where the host adds initial
    buckets to a document's first chunk (function.py). On an H200 (bf16, H=32, K=128, Hk=1, V=64,
    8K x 4) the stage took 0.328 ms without the copy, 0.391 with it and every float32 store, and
    0.319 with the copy and these stores only (three leases)."""
    offsets = (i * H + h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    even = (c & 1) == 0
    if COPY:
        tl.store(copy + offsets, u.to(copy.dtype.element_ty), mask=mask & (even | (((c >> 1) & 1) == 0)))
        mask = mask & ((even == 0) | (c == c0) | (c + 1 == end))
    tl.store(states + offsets, u, mask=mask)
    if tile == 0:
        tl.store(totals + i * H + h, total)


def chunk_states(k, v, g, layout, prec, copy=False):
    """k [rows, Hk, K], v [rows, H, V], g [rows, H] -> (states [S, H, K, V] f32, copy, totals [S, H]
    f32); odd chunks with a left sibling in their document hold the pair's node (up-sweep height 0).

    copy: also return the tree's bf16 copy [S, H, K, V] (else None), which tree.up_sweep completes;
    the float32 tree then holds only the nodes read again in float32 (store_state). Where the
    readers round each float32 node to bf16 for its product anyway (bf16 inputs,
    common.mma_f32), they read the copy instead: bitwise the same results from half the bytes.
    On an H200 (bf16, H=32, K=128, Hk=1, V=64) the output stage took 0.583 -> 0.480 ms and
    query_grad 0.946 -> 0.882 at 8K x 4 on a copy (2.77 -> 2.31 and 4.61 -> 4.26 at 128K)."""
    H, K, V = v.shape[1], k.shape[2], v.shape[2]
    S = layout.num_slots
    states = torch.empty(S, H, K, V, device=v.device, dtype=torch.float32)
    half = torch.empty(S, H, K, V, device=v.device, dtype=torch.bfloat16) if copy else None
    totals = torch.empty(S, H, device=v.device, dtype=torch.float32)
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    grid = (S, H, triton.cdiv(K, BK) * triton.cdiv(V, BV))
    chunk_state_kernel[grid](k, v, g, layout.docs, layout.slot_doc, layout.slot_chunk, states,
                             states if half is None else half, totals, H, k.shape[1], K, V, C=layout.chunk, BK=BK,
                             BV=BV, PREC=prec, COPY=copy, maxnreg=register_cap(k.dtype, 4))
    return states, half, totals


@triton.jit
def cumulative_decay_kernel(totals, gc, docs, H, BLOCK: tl.constexpr):
    """One program per (document, head): the running float64 sum of its slots' totals."""
    n, h = tl.program_id(0), tl.program_id(1)
    row = docs + n * 6
    count, first = tl.load(row + 4) - tl.load(row + 3) + 1, tl.load(row + 5)
    carry = tl.zeros([1], dtype=tl.float64)
    for b in range(0, tl.cdiv(count, BLOCK)):
        j = b * BLOCK + tl.arange(0, BLOCK)
        offsets = (first + j) * H + h
        x = tl.load(totals + offsets, mask=j < count, other=0.0).to(tl.float64)
        tl.store(gc + offsets, tl.cumsum(x, 0) + carry, mask=j < count)
        carry += tl.sum(x, 0)


def cumulative_decay(totals, layout):
    """float64 [S, H]: sum of g from each document's first token to the end of each slot's chunk.
    One launch: as torch ops (a transposed scan, then each document's offset taken off) it was
    eight small kernels, 0.07 ms of a 5.4 ms step at 8K tokens x 4 on an H200."""
    gc = torch.empty(totals.shape, device=totals.device, dtype=torch.float64)
    cumulative_decay_kernel[(layout.num_docs, totals.shape[1])](totals, gc, layout.docs, totals.shape[1],
                                                                BLOCK=SCAN_BLOCK)
    return gc
