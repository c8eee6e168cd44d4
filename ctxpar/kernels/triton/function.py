"""The autograd Function over the kernel stages, and the glue for Fenwick states.

Inside the Function everything is chunk-level: chunk states, the tree (with the initial state's
chunk-level buckets as nodes in front of each document), outputs, and the tree nodes the final
state is made of. The parts that touch single tokens of one chunk per document (the initial
state's sub-chunk buckets, the final state's sub-chunk buckets and the carries to the last token)
are a few small differentiable torch ops around it.

Gradient of g: dg_r sums the pairs that straddle r, in shares that are each a sum of such pairs
(dg.py), never a difference of large per-token terms. The states that enter or leave the Function
at a chunk end (the sub-chunk initial buckets injected into the first chunk's state, the final
state's tree nodes) need no extra term: inside the Function their pairs start or end at that
chunk end, and the tree's shares already cover exactly the chunks in between.
"""

from __future__ import annotations

import torch

from ctxpar.kernels.levels import bucket_range, level_of, live_bits
from ctxpar.kernels.state import FenwickState
from ctxpar.kernels.triton.chunk_state import chunk_states, cumulative_decay
from ctxpar.kernels.triton.common import dot_precision
from ctxpar.kernels.triton.dg import straddle
from ctxpar.kernels.triton.layout import build_layout
from ctxpar.kernels.triton.node_grad import node_grads
from ctxpar.kernels.triton.output import outputs
from ctxpar.kernels.triton.query_grad import query_grads
from ctxpar.kernels.triton.rows_first import rows_first
from ctxpar.kernels.triton.source_grad import source_grads
from ctxpar.kernels.triton.tree import down_sweep, up_sweep

DEFAULT_CHUNK = 64
DEFAULT_SEGMENT = 32  # chunks per node-gradient segment (node_grad.py)


class Plan:
    """Host-side bookkeeping of one call: the layout plus which states enter and leave where."""

    def __init__(self, layout, extra_docs, finals):
        self.layout = layout
        self.extra_docs = extra_docs  # documents whose first chunk state gets sub-chunk initial buckets
        self.finals = finals  # [(doc, height, node end chunk e)] tree nodes of the final states
        self.first_slot = layout.first_slot
        self.final_in_slots = [e >= layout.c0[n] for n, _, e in finals]
        self.final_index = [self.first_slot[n] + e - layout.c0[n] if s else (n, h)
                            for (n, h, e), s in zip(finals, self.final_in_slots)]


class LogLinearMamba2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, lam, init_nodes, leaf_extra, plan, prec):
        states, copy, gc = build_tree(k, v, g, init_nodes, leaf_extra, plan, prec, copy=k.dtype == torch.bfloat16)
        # bf16 inputs: every product rounds the nodes to bf16 (common.mma_f32), so the readers and
        # the backward keep the tree's bf16 copy (half the bytes; the float32 tree is freed here).
        # dg's tree transports (tree.down_sweep, source_grad) then take the rounded nodes too: the
        # bf16 GPU test with states in and out had dg errors of 2.0-2.9e-3 before and 2.6-3.0e-3
        # after on an H200 (three runs each; one more run gave 5.5e-3, bound 1e-2).
        nodes = states if copy is None else copy
        o = outputs(q, k, v, g, lam, nodes, init_nodes, gc, plan.layout, prec)
        final = _gather_finals(states, init_nodes, plan)
        ctx.save_for_backward(q, k, v, g, lam, init_nodes, leaf_extra, nodes, gc)
        ctx.plan, ctx.prec = plan, prec
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, lam, init_nodes, leaf_extra, nodes, gc = ctx.saved_tensors
        plan, prec = ctx.plan, ctx.prec
        layout = plan.layout
        do = do.contiguous()
        grads = torch.empty_like(nodes, dtype=torch.float32)
        # node_grads stores every other slot; assigning through the index tensor synced the host
        grads.index_fill_(0, layout.shared_slots, 0)
        init_grads = None if init_nodes is None else torch.zeros_like(init_nodes)
        node_grads(q, do, g, lam, gc, grads, init_grads, layout, prec)
        if dfinal is not None and plan.finals:
            _scatter_finals(dfinal, grads, init_grads, plan)
        ys = torch.zeros(layout.num_slots, nodes.shape[1], max(layout.heights, 1), device=nodes.device)
        down_sweep(grads, nodes, ys, gc, layout)
        if init_grads is not None:
            _push_to_initial_nodes(grads, init_grads, init_nodes, ys, gc, plan)
        dq, dlam, dg, xs = query_grads(q, k, v, g, lam, do, nodes, init_nodes, gc, layout, prec)
        dk, dv = source_grads(q, k, v, g, lam, do, grads, nodes, gc, straddle(xs, ys, layout), dlam, dg, layout, prec)
        d_extra = None if leaf_extra is None else _extra_grad(grads, gc, plan)
        return (dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), rows_first(dlam, lam.dtype), init_grads, d_extra,
                None, None)


def build_tree(k, v, g, init_nodes, leaf_extra, plan, prec, copy):
    """-> (the up-swept tree [S, H, K, V] float32, its bf16 copy if asked for (else None), the
    chunk-level cumulative decays gc)."""
    layout = plan.layout
    states, copy, totals = chunk_states(k, v, g, layout, prec, copy)
    gc = cumulative_decay(totals, layout)
    if leaf_extra is not None:
        _add_extra(states, copy, leaf_extra, gc, plan)
    up_sweep(states, copy, init_nodes, gc, layout)
    return states, copy, gc


def _index(values, picks, device):
    return torch.tensor([values[p] for p in picks], dtype=torch.long, device=device)


def _add_extra(states, copy, leaf_extra, gc, plan):
    """The sub-chunk initial buckets into their document's first chunk state, and into its
    right sibling's where chunk_state folded the pair; the bf16 copy of those slots taken again
    (the up-sweep writes it once more where it builds on them)."""
    firsts = _index(plan.first_slot, plan.extra_docs, states.device)
    states.index_add_(0, firsts, leaf_extra)
    folded = _folded_firsts(plan)
    for j, slot in folded:
        states[slot + 1] += _pair_decay(gc, slot) * leaf_extra[j]
    if copy is not None:
        touched = torch.cat([firsts, firsts.new_tensor([slot + 1 for _, slot in folded])])
        copy[touched] = states[touched].to(copy.dtype)


def _extra_grad(grads, gc, plan):
    """The gradient of ``_add_extra``'s buckets: their first chunk state's, plus its parent's where
    the chunk is a left child (source_grad adds that height of the down-sweep in registers only)."""
    d_extra = grads[_index(plan.first_slot, plan.extra_docs, grads.device)]
    for j, slot in _folded_firsts(plan):
        d_extra[j] += _pair_decay(gc, slot) * grads[slot + 1]
    return d_extra


def _folded_firsts(plan):
    """(index in extra_docs, first slot) of the documents whose first chunk is even and has a
    successor: chunk_state folded it into the successor's pair node."""
    layout = plan.layout
    return [(j, plan.first_slot[n]) for j, n in enumerate(plan.extra_docs)
            if layout.c0[n] % 2 == 0 and layout.c0[n] < layout.c_last[n]]


def _pair_decay(gc, slot):
    """[H, 1, 1] decay across the chunk after ``slot``."""
    return torch.exp(gc[slot + 1] - gc[slot]).float()[:, None, None]


def _gather_finals(states, init_nodes, plan):
    if not plan.finals:
        return states.new_zeros(0, *states.shape[1:])
    rows = [states[i] if s else _initial_node(init_nodes, i, states)
            for i, s in zip(plan.final_index, plan.final_in_slots)]
    return torch.stack(rows)


def _initial_node(init_nodes, index, states):
    """Initial node (document, height): zero where no initial state holds anything (a context-
    parallel rank's piece from an empty state, whose final state has a bucket ending before it)."""
    return states.new_zeros(states.shape[1:]) if init_nodes is None else init_nodes[index[0], :, index[1]]


def _scatter_finals(dfinal, grads, init_grads, plan):
    for j, (i, s) in enumerate(zip(plan.final_index, plan.final_in_slots)):
        if s:
            grads[i] += dfinal[j]
        elif init_grads is not None:
            init_grads[i[0], :, i[1]] += dfinal[j]


def _push_to_initial_nodes(grads, init_grads, init_nodes, ys, gc, plan):
    """Initial node (n, h) is the left child of the parent ending at chunk ((c0 >> h) + 1) 2^h - 1;
    like tree.down_sweep, also adds that transport's dg share to ys."""
    layout = plan.layout
    for n in range(layout.num_docs):
        c0, c_last = layout.c0[n], layout.c_last[n]
        for h in live_bits(c0):
            parent = (((c0 >> h) + 1) << h) - 1
            if h < init_grads.shape[2] and parent <= c_last:
                slot = plan.first_slot[n] + parent - c0
                decay = torch.exp(gc[slot]).float()
                init_grads[n, :, h] += decay[:, None, None] * grads[slot]
                ys[slot, :, h] += decay * (init_nodes[n, :, h] * grads[slot]).sum((-1, -2))


def chunked(q, k, v, g, beta, lam, spans, initial_state=None, output_final_state=False,
            chunk_size=DEFAULT_CHUNK, segment=DEFAULT_SEGMENT):
    """``torch_chunked.chunked``'s contract on the Triton kernels; q, k may keep Hk < H heads.

    q, k: [B, T, Hk, K] (already scaled); v: [B, T, H, V]; g: [B, T, H]; lam: [B, T, H, L];
    spans: [(batch, start, end)]. Float64 inputs run in float32. Returns (o [B, T, H, V],
    FenwickState or None).
    """
    if beta is not None:
        raise ValueError("beta given: Gated DeltaNet runs in gdn_function.chunked")
    out_dtype = v.dtype
    if v.dtype == torch.float64:
        q, k, v, lam = (x.float() for x in (q, k, v, lam))
    g = g.float()
    B, T, H, V = v.shape
    C = chunk_size
    log_c = C.bit_length() - 1
    starts = list(initial_state.positions) if initial_state is not None else [0] * len(spans)
    layout = build_layout(spans, starts, T, C, segment, v.device)
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
    fq, fk, fv, fg, flam = (flat(x) for x in (q, k, v, g, lam))
    # A state that holds nothing only sets the positions: no initial-node reads in the kernels.
    buckets = None if initial_state is None or initial_state.holds_nothing else initial_state.buckets.float()
    docs = _Docs(spans, starts, layout, fq, fk, fv, fg, flam, H)

    init_nodes, leaf_extra, extra_docs = None, None, []
    if buckets is not None:
        init_nodes = _initial_nodes(buckets, layout, log_c)
        extra_docs = [n for n in range(len(spans)) if starts[n] % C]
        if extra_docs:
            leaf_extra = torch.stack([docs.first_chunk_extra(n, buckets[n], log_c) for n in extra_docs])
    finals = _final_nodes(layout, log_c) if output_final_state else []
    plan = Plan(layout, extra_docs, finals)
    prec = dot_precision(fq.dtype)
    o, final_nodes = LogLinearMamba2.apply(fq, fk, fv, fg, flam, init_nodes, leaf_extra, plan, prec)
    if extra_docs:
        o = o.index_add(0, *docs.first_chunk_reads(extra_docs, buckets, log_c))
    o = o.reshape(B, T, H, V).to(out_dtype)
    state = docs.final_state(final_nodes, plan, buckets, log_c) if output_final_state else None
    return o, state


def _initial_nodes(buckets, layout, log_c):
    """[N, H, NI, K, V]: the initial buckets of bits log2 C + h, the tree nodes before chunk c0."""
    ni = max(max(layout.c0).bit_length(), 1)
    nodes = buckets[:, :, log_c : log_c + ni]
    missing = ni - nodes.shape[2]
    if missing:
        nodes = torch.cat([nodes, nodes.new_zeros(*nodes.shape[:2], missing, *nodes.shape[3:])], dim=2)
    return nodes.contiguous()


def _final_nodes(layout, log_c):
    """[(doc, height, node end chunk)] for the chunk-level bits of each document's end position."""
    out = []
    for n in range(layout.num_docs):
        ce = (layout.starts[n] + layout.lengths[n]) >> log_c
        out += [(n, h, ((ce >> h) << h) - 1) for h in live_bits(ce)]
    return out


class _Docs:
    """Per-document token slices for the sub-chunk glue (positions are absolute: t0 + offset)."""

    def __init__(self, spans, starts, layout, q, k, v, g, lam, heads):
        self.spans, self.starts, self.layout = spans, starts, layout
        self.q, self.k, self.v, self.g, self.lam = q, k, v, g, lam
        self.heads_of = torch.arange(heads, device=q.device) // (heads // q.shape[1])

    def rows(self, n, lo, hi):
        """Flattened rows of document n's absolute positions [lo, hi)."""
        base = self.layout.token_start[n] - self.starts[n]
        return slice(base + lo, base + hi)

    def log_decay(self, n, lo, hi):
        """float64 [hi - lo, H]: G at positions [lo, hi) from the document's start position.
        A sum up to lo and a scan over [lo, hi) only: callers ask for a few positions of a long
        document, and a scan along a [T, H] tensor's first dim is slow on the GPU (H threads)."""
        before = self.g[self.rows(n, self.starts[n], lo)].double().sum(0)
        return before + self.g[self.rows(n, lo, hi)].double().cumsum(0)

    def first_chunk_end(self, n, log_c):
        t0 = self.starts[n]
        return min(((t0 >> log_c) + 1) << log_c, t0 + self.length(n))

    def length(self, n):
        return self.spans[n][2] - self.spans[n][1]

    def first_chunk_extra(self, n, buckets, log_c):
        """exp(G at the first chunk's last token) * (sum of the sub-chunk initial buckets)."""
        t0, end = self.starts[n], self.first_chunk_end(n, log_c)
        sub = buckets[:, [b for b in live_bits(t0) if b < log_c]].sum(1)
        return torch.exp(self.log_decay(n, end - 1, end)[0]).float()[:, None, None] * sub

    def first_chunk_reads(self, extra_docs, buckets, log_c):
        """(rows, outputs) of the first chunk's queries reading the sub-chunk initial buckets."""
        rows, outs = [], []
        for n in extra_docs:
            t0, end = self.starts[n], self.first_chunk_end(n, log_c)
            r = self.rows(n, t0, end)
            q = self.q[r][:, self.heads_of].float()  # [m, H, K]
            decay = torch.exp(self.log_decay(n, t0, end)).float()  # [m, H]
            positions = torch.arange(t0, end, device=q.device)
            out = 0
            for b in [b for b in live_bits(t0) if b < log_c]:
                level = level_of(positions, bucket_range(t0, b)[0])
                lam = self.lam[r].float().gather(2, level[:, None, None].expand(-1, q.shape[1], 1))[..., 0]
                out = out + (lam * decay)[..., None] * torch.einsum("thk,hkv->thv", q, buckets[n, :, b])
            rows.append(torch.arange(r.start, r.stop, device=q.device))
            outs.append(out.to(self.v.dtype))
        return torch.cat(rows), torch.cat(outs)

    def final_state(self, final_nodes, plan, buckets, log_c):
        states = []
        for n in range(len(self.spans)):
            t_end = self.starts[n] + self.length(n)
            g_last = self.log_decay(n, t_end - 1, t_end)[0]
            nb = {}
            for j, (m, h, e) in enumerate(plan.finals):
                if m == n:
                    end = ((e + 1) << log_c) - 1
                    g_node = self.log_decay(n, end, end + 1)[0] if plan.final_in_slots[j] else 0.0
                    nb[h + log_c] = torch.exp(g_last - g_node).float()[:, None, None] * final_nodes[j]
            for b in [b for b in live_bits(t_end) if b < log_c]:
                nb[b] = self._sub_chunk_bucket(n, t_end, b, g_last, buckets)
            zero = final_nodes.new_zeros(self.v.shape[1], self.k.shape[2], self.v.shape[2])
            stacked = torch.stack([nb.get(b, zero) for b in range(t_end.bit_length())], dim=1)
            states.append(FenwickState(stacked[None], (t_end,)))
        return FenwickState.stack(states)

    def _sub_chunk_bucket(self, n, t_end, b, g_last, buckets):
        """Bucket of bit b < log2 C of t_end: its tokens, plus initial buckets nested in it."""
        t0 = self.starts[n]
        lo, hi = bucket_range(t_end, b)
        out = 0
        if hi > max(lo, t0):
            r = self.rows(n, max(lo, t0), hi)
            carry = torch.exp(g_last - self.log_decay(n, max(lo, t0), hi)).float()  # [m, H]
            k = self.k[r][:, self.heads_of].float()
            out = torch.einsum("shk,sh,shv->hkv", k, carry, self.v[r].float())
        if buckets is not None:
            for b0 in live_bits(t0):
                lo0, hi0 = bucket_range(t0, b0)
                if lo <= lo0 and hi0 <= hi:
                    out = out + torch.exp(g_last).float()[:, None, None] * buckets[n, :, b0]
        return out
