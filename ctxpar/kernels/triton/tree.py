"""Stage 2 (counterpart: ``torch_chunked.build_tree``): the segment tree over chunks, in place.

Up-sweep, height h = 0, 1, ...: every slot j with ones(j) >= h + 1 becomes the parent of its two
height-h children, ``slot[j] += exp(gc[j] - gc[j - 2^h]) * slot[j - 2^h]`` (the right child already
sits in slot j). A left child that ends before the document's first chunk is the initial state's
node of that height (carried with decay exp(gc[j]), since initial nodes sit at t0). Height 0
with both children in slots is done by chunk_state.py; here it only adds initial nodes, to the
first slot of each document whose first chunk is odd (layout.first_odd_slots). A slot is done at
the height that leaves bit h + 1 of its chunk clear; there its program also writes the bf16 copy of
the tree (chunk_state.chunk_states), if there is one.

Down-sweep (backward), height h = top .. 0: each left node of height h receives its parent's
gradient, ``d[j] += exp(gc[j + 2^h] - gc[j]) * d[j + 2^h]``, so that afterwards slot c holds the
gradient of chunk c's own end state. One launch per height; programs tile K x V. Height 0 is
left to source_grad.py, which reads each slot's gradient anyway.

The same step yields the transport's share of dg: ``y = <exp(...) * left, d parent>`` is the sum of
every pair (source in the left child, query reading the parent) and so belongs to every g of the
right child. It is stored at ``ys[parent slot, head, h]`` (see dg.py).
"""

import triton
import triton.language as tl

from ctxpar.kernels.triton.common import load_node, slot_info


@triton.jit
def up_kernel(states, copy, init, gc, slots, docs, slot_doc, slot_chunk, height, H, NI, K, V,
              BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, COPY: tl.constexpr):
    j = tl.load(slots + tl.program_id(0)).to(tl.int64)
    h, tile = tl.program_id(1), tl.program_id(2)
    rk = tile // tl.cdiv(V, BV) * BK + tl.arange(0, BK)
    rv = tile % tl.cdiv(V, BV) * BV + tl.arange(0, BV)
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, j)
    left_in_slots = c - (1 << height) >= c0
    left = tl.where(left_in_slots, j - (1 << height), 0)
    gc_left = tl.load(gc + left * H + h, mask=left_in_slots, other=0.0)
    decay = tl.exp((tl.load(gc + j * H + h) - gc_left).to(tl.float32))
    x = load_node(states, init, left_in_slots, left, n, h, height, H, NI, K, V, rk, rv, mask, HAS_INIT)
    offsets = (j * H + h) * K * V + rk[:, None] * V + rv[None, :]
    node = tl.load(states + offsets, mask=mask) + decay * x
    tl.store(states + offsets, node, mask=mask)
    if COPY:
        tl.store(copy + offsets, node.to(copy.dtype.element_ty), mask=mask & (((c >> (height + 1)) & 1) == 0))


@triton.jit
def down_kernel(grads, states, ys, gc, slots, docs, slot_doc, slot_chunk, height, H, K, V, NH,
                BK: tl.constexpr, BV: tl.constexpr):
    j = tl.load(slots + tl.program_id(0)).to(tl.int64)
    h, tile = tl.program_id(1), tl.program_id(2)
    n, c, token_start, t0, length, c0, c_last, first = slot_info(docs, slot_doc, slot_chunk, j)
    if c + (1 << height) <= c_last:
        parent = j + (1 << height)
        rk = tile // tl.cdiv(V, BV) * BK + tl.arange(0, BK)
        rv = tile % tl.cdiv(V, BV) * BV + tl.arange(0, BV)
        mask = (rk[:, None] < K) & (rv[None, :] < V)
        decay = tl.exp((tl.load(gc + parent * H + h) - tl.load(gc + j * H + h)).to(tl.float32))
        tile_off = rk[:, None] * V + rv[None, :]
        d_parent = tl.load(grads + (parent * H + h) * K * V + tile_off, mask=mask, other=0.0)
        left = tl.load(states + (j * H + h) * K * V + tile_off, mask=mask, other=0.0)
        tl.atomic_add(ys + (parent * H + h) * NH + height, decay * tl.sum(left * d_parent))
        ptr = grads + (j * H + h) * K * V + tile_off
        tl.store(ptr, tl.load(ptr, mask=mask) + decay * d_parent, mask=mask)


def _grid(count, states):
    H, K, V = states.shape[1:]
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    return (count, H, triton.cdiv(K, BK) * triton.cdiv(V, BV)), BK, BV


def up_sweep(states, copy, init, gc, layout):
    """In place: chunk_states' output [S, H, K, V] -> Fenwick array of tree nodes, and its bf16
    copy (or None) completed. init: [N, H, NI, K, V] or None."""
    H, K, V = states.shape[1:]
    for h in range(layout.heights):
        slots = layout.slots_up(h)
        if slots.numel() == 0:
            break
        if h == 0:  # chunk_state built height 1 where both children are slots
            if init is None or not layout.first_odd_slots.numel():
                continue
            slots = layout.first_odd_slots
        grid, BK, BV = _grid(slots.numel(), states)
        up_kernel[grid](states, states if copy is None else copy, states if init is None else init, gc, slots,
                        layout.docs, layout.slot_doc, layout.slot_chunk, h, H, 1 if init is None else init.shape[2],
                        K, V, BK=BK, BV=BV, HAS_INIT=init is not None, COPY=copy is not None)


def down_sweep(grads, states, ys, gc, layout):
    """In place: gradients of the read nodes, each pushed down to its left children of height >= 1
    (source_grad pushes height 0 in registers); adds each transport's dg share into ys [S, H, NH]
    (states: the up-swept tree, or its bf16 copy where the forward's products read that)."""
    H, K, V = grads.shape[1:]
    for h in reversed(range(1, layout.heights)):
        slots = layout.slots_down(h)
        if slots.numel() == 0:
            continue
        grid, BK, BV = _grid(slots.numel(), grads)
        down_kernel[grid](grads, states, ys, gc, slots, layout.docs, layout.slot_doc, layout.slot_chunk, h, H, K, V,
                          ys.shape[2], BK=BK, BV=BV)
