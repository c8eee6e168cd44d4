"""Log-linear Gated DeltaNet on the Triton path: the stages tied into one differentiable op.

Design. Inside a chunk the delta rule needs the UT transform (a triangular solve per chunk and
head) and masked C x C products: that is the chunk stage, a Triton kernel (gdn_chunk.py) that
writes each chunk's queries carried to its start Qt, end state U, transition M and intra-chunk
output; its backward (gdn_chunk_grad.py) is the mirror kernel. Across chunks everything is a
batched K x K product over all nodes of one tree height, one launch per height (bf16 tensor cores
for half-precision inputs): the up-sweep (gdn_tree.py, S products);
the node reads (gdn_carry.py, O(S log S) products, the bulk of the work) carry each chunk's
queries down its bits in one program per slot and head. Each is an autograd Function with its
own backward.

Initial and final Fenwick states: the initial buckets of bits >= log2 C are tree nodes in front of
each document (left children and read nodes with identity transitions); the sub-chunk buckets
enter the first chunk's end state and are read by its queries at their token levels. The final
state's chunk-level buckets are tree nodes carried to the last token; its sub-chunk buckets come
from the last chunk's UT columns E (torch_chunked.chunk_stage on that one chunk).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ctxpar.kernels import torch_chunked
from ctxpar.kernels.levels import bucket_range, level_of, live_bits
from ctxpar.kernels.state import FenwickState
from ctxpar.kernels.triton.common import dot_precision
from ctxpar.kernels.triton.gdn_carry import CarryReads
from ctxpar.kernels.triton.gdn_chunk import chunk_stage
from ctxpar.kernels.triton.gdn_chunk_grad import chunk_stage_grads
from ctxpar.kernels.triton.gdn_grid import SlotGrid
from ctxpar.kernels.triton.gdn_tree import TreePlan, carried_node, operand_dtype, tree_copies, up_sweep
from ctxpar.kernels.triton.layout import build_layout

DEFAULT_CHUNK = 64
READ_RUN = 32  # most readers of a node per node-gradient program (gdn_carry.py)


class ChunkStage(torch.autograd.Function):
    """gdn_chunk.chunk_stage, backward gdn_chunk_grad.chunk_stage_grads (with the forward's N and P).
    ``copies`` (the tree's, no gradients) get height 0 stored; U and M in float32 whole only if
    ``filled`` (chunk_stage), else stand-ins in the gradients' dtype (gdn_tree.gradient_dtype)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lam, scale, layout, prec, tree_rows, copies, filled):
        o, qt, u, m, inv, pairs = chunk_stage(q, k, v, g, beta, lam, scale, layout, prec, tree_rows, copies, filled)
        ctx.save_for_backward(q, k, v, g, beta, lam, inv, pairs, tree_rows)
        ctx.layout, ctx.prec, ctx.scale = layout, prec, scale
        return o, qt, u, m

    @staticmethod
    def backward(ctx, d_o, d_qt, d_u, d_m):
        *inputs, inv, pairs, tree_rows = ctx.saved_tensors
        grads = chunk_stage_grads(*inputs, ctx.scale, inv, pairs, d_o, d_qt, d_u, d_m, ctx.layout, ctx.prec, tree_rows)
        return (*(d.to(x.dtype) for d, x in zip(grads, inputs)), None, None, None, None, None, None)


def chunked(q, k, v, g, beta, lam, spans, initial_state=None, output_final_state=False, chunk_size=DEFAULT_CHUNK,
            scale=1.0):
    """``torch_chunked.chunked``'s contract for Gated DeltaNet, for the queries q * scale (the
    kernels take the scale in); q, k may keep Hk < H heads.

    q, k: [B, T, Hk, K]; v: [B, T, H, V]; g, beta: [B, T, H]; lam: [B, T, H, L];
    spans: [(batch, start, end)]. Float64 inputs run in float32. Returns (o [B, T, H, V],
    FenwickState or None).
    """
    out_dtype = v.dtype
    if v.dtype == torch.float64:
        q, k, v, beta, lam = (x.float() for x in (q, k, v, beta, lam))
    B, T, H, V = v.shape
    C, log_c = chunk_size, chunk_size.bit_length() - 1
    starts = list(initial_state.positions) if initial_state is not None else [0] * len(spans)
    layout, grid, plan = _tables(tuple(map(tuple, spans)), tuple(starts), B * T, T, C, H, q.shape[2], v.device)
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
    fq, fk, fv, fg, fb, flam = (flat(x) for x in (q, k, v, g.float(), beta, lam))
    prec = dot_precision(fq.dtype)
    copies = tree_copies(plan, H, k.shape[-1], V, operand_dtype(fq.dtype), v.device)
    has_init = initial_state is not None and not initial_state.holds_nothing  # one that does only sets positions
    # The float32 nodes and transitions are read whole only by an initial state's glue and the final
    # state (else only what the up-sweep needs of them); u and m come in tree order.
    filled = has_init or output_final_state
    o, qt, u, m = ChunkStage.apply(fq, fk, fv, fg, fb, flam, scale, layout, prec, plan.rank, copies, filled)
    lam_slots = slot_lambdas(flam, grid, layout, log_c)

    buckets = init = None
    if has_init:
        buckets = initial_state.buckets.float()
        init = buckets[:, :, log_c:]
        o, u = _first_chunk_glue(o, u, m, qt, lam_slots, buckets, plan, grid, log_c, copies[0])
    nodes, trans, copies = up_sweep(u, m, init, plan, prec, copies, filled)
    out = CarryReads.apply(o, qt, lam_slots, init, plan, log_c, prec, copies, fv.dtype, nodes, *trans)
    out = out.reshape(B, T, H, V).to(out_dtype)  # a cast for float64 inputs only
    if not output_final_state:
        return out, None
    columns = _last_chunk_columns(layout, grid, (fq, fk, fv, fg, fb), log_c)
    finals = [_final_buckets(n, nodes, trans, init, plan, m, columns.get(n), buckets, log_c)
              for n in range(layout.num_docs)]
    return out, FenwickState.stack(finals)


@functools.lru_cache(maxsize=16)
def _tables(spans, starts, rows, length, chunk, heads, qk_heads, device):
    """The index tables of one call shape (layout, slot grid, tree plan), cached: a training loop
    repeats its shapes every step, and building them costs host time and many small copies."""
    layout = build_layout(list(spans), list(starts), length, chunk, READ_RUN, device)
    return layout, SlotGrid(layout, rows, heads, qk_heads, device), TreePlan(layout, device)


def slot_lambdas(lam, grid, layout, log_c):
    """lam [rows, H, L] -> [S, H, C, L'] float32 in the slot grid, the reads' weights. Levels past
    the lambdas given weigh only padded positions: zeros keep every gather in range."""
    width = _slot_levels(max(log_c + 1 + layout.heights, lam.shape[-1]))
    return grid.tokens(F.pad(lam.float(), (0, width - lam.shape[-1])))


def _slot_levels(levels):
    """Levels of the slot grid's lambda rows (at least ``levels``): one more where rows of float32
    lambdas would fill whole 16-byte vectors, which send PyTorch's gathers (the grid's, both ways)
    to a kernel with one block per row, a few threads of it busy: on an H200 at 32K tokens, H=16
    (16 levels, 64-byte rows) 0.63 ms of the op's 11.0 (results/2026-12-02-h200-gdn-session24.json),
    against 0.30 ms at 128K (18 levels, 72-byte rows, the element-wise gather) for 4x the rows
    (...-session22.json). The padded level took the op (bf16, same run) from 10.74 to 10.22 ms at
    32K tokens and from 180.85 to 173.16 at 512K (20 levels) for H=16, K=V=128, and from 12.20 to
    12.00 and 219.97 to 218.30 for H=6, K=192, V=384 (results/2026-12-02-h200-gdn-session26.json)."""
    return levels + (levels % 4 == 0)


def _first_chunk_glue(o, u, m, qt, lam_slots, buckets, plan, grid, log_c, node_copy):
    """The initial buckets of bits < log2 C: carried into the first chunk's end state (and into its
    row of the tree's copy), and read by the first chunk's queries (Qt is already carried to t0) at
    their token-level levels, added to o's token rows of those chunks."""
    layout, C = plan.layout, 1 << log_c
    docs = [n for n in range(layout.num_docs) if layout.starts[n] % C]
    if not docs:
        return o, u
    first = [layout.first_slot[n] for n in docs]
    slots = torch.tensor(first, device=o.device)
    subs = [[b for b in live_bits(layout.starts[n]) if b < log_c] for n in docs]
    tree_rows = plan.rank[slots]  # the slots' rows of u and m
    carried = m[tree_rows] @ torch.stack([buckets[n, :, bits].sum(1) for n, bits in zip(docs, subs)])
    reads, offsets = [], torch.arange(C, device=o.device)
    for n, bits, slot in zip(docs, subs, first):
        part = 0
        for b in bits:
            level = level_of(layout.c0[n] * C + offsets, bucket_range(layout.starts[n], b)[0])
            part = part + lam_slots[slot][:, offsets, level][..., None] * (qt[slot].float() @ buckets[n, :, b])
        reads.append(part)
    rows = grid.index.view(layout.num_slots, C)[slots]
    real = rows < o.shape[0]  # the others are padded positions
    u = u.index_add(0, tree_rows, carried)
    node_copy[tree_rows] = u[tree_rows].to(node_copy.dtype)
    return o.index_add(0, rows[real], torch.stack(reads).transpose(1, 2)[real].to(o.dtype)), u


def _last_chunk_columns(layout, grid, inputs, log_c):
    """{document: (E [H, K, C], v [H, C, V])} of the documents that end inside a chunk: that last
    chunk's UT columns (token s's state contribution is E[:, s] v_s^T), one torch chunk stage for all."""
    C = 1 << log_c
    docs = [n for n in range(layout.num_docs) if (layout.starts[n] + layout.lengths[n]) % C]
    if not docs:
        return {}
    lasts = [layout.first_slot[n] + layout.c_last[n] - layout.c0[n] for n in docs]
    expand = (True, True, False, False, False)  # q, k have Hk heads
    q, k, v, g, beta = (grid.tokens(x.float(), e, lasts).transpose(0, 1)[None] for x, e in zip(inputs, expand))
    e = torch_chunked.chunk_stage(q, k, v, g, beta)["E"][0]  # [H, docs, K, C]
    return {n: (e[:, j], v[0, :, j]) for j, n in enumerate(docs)}


def _final_buckets(n, nodes, trans, init, plan, m, columns, buckets, log_c):
    """Document n's Fenwick state at its end t_end: the tree nodes of the bits >= log2 C carried
    to the last token, and the sub-chunk buckets from the last chunk's own tokens (``columns``)."""
    layout, C = plan.layout, 1 << log_c
    t0, t_end = layout.starts[n], layout.starts[n] + layout.lengths[n]
    ce = t_end >> log_c
    m_last = m[plan.slot_rank(n, ce)] if t_end % C else None  # the partial last chunk's transition
    state = {}
    for h in live_bits(ce):
        node = carried_node(nodes, trans, init, plan, n, ce, h)
        state[h + log_c] = node if m_last is None else m_last @ node
    for b in [b for b in live_bits(t_end) if b < log_c]:
        e, v = columns
        lo, hi = (x - ce * C for x in bucket_range(t_end, b))
        state[b] = e[:, :, lo:hi] @ v[:, lo:hi]
        for b0 in live_bits(t0) if buckets is not None else []:  # initial buckets nested in this one
            lo0, hi0 = (x - ce * C for x in bucket_range(t0, b0))
            if lo <= lo0 and hi0 <= hi:  # (only when t0 and t_end share the chunk)
                state[b] = state[b] + m_last @ buckets[n, :, b0]
    zero = m.new_zeros(m.shape[1], m.shape[2], nodes.shape[-1])
    stacked = torch.stack([state.get(b, zero) for b in range(t_end.bit_length())], dim=1)
    return FenwickState(stacked[None], (t_end,))
