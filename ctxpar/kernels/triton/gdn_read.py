"""GDN stage 3 (counterpart: ``torch_chunked.read_tree``): every chunk's reads of tree nodes.

For each height h, the chunks with bit h set read their node carried to the chunk start
(gdn_tree.Read) with the queries carried there, Qt, weighed by lambda level log2 C + 1 + h. This
is one autograd Function with a hand-written backward, not autograd over torch ops: each height's
carried nodes fill one preallocated pool in place (autograd would copy the growing pool at every
step, or keep it), and the backward rebuilds the pool instead of storing it, so nothing of size
S log S is ever kept. All products are batched over the height's chunks (cuBLAS).
"""

from __future__ import annotations

import torch

from ctxpar.kernels.triton.gdn_tree import initial_node


def _pool(r, nodes, trans, init, plan):
    """Height r.height's carried nodes [N + readers, H, K, V] and each step's rows [lo, hi)."""
    base = initial_node(init, r.height, nodes[0], plan.num_docs)
    count = plan.num_docs + r.node_rank.numel() + sum(src.numel() for _, _, src in r.steps)
    pool = base.new_empty(count, *base.shape[1:])
    pool[: plan.num_docs] = base
    lo = plan.num_docs + r.node_rank.numel()
    if r.node_rank.numel():
        pool[plan.num_docs : lo] = nodes[r.height][r.node_rank]
    blocks = []
    for j, prev, src in r.steps:
        torch.matmul(trans[j][prev], pool[src], out=pool[lo : lo + src.numel()])
        blocks.append((lo, lo + src.numel()))
        lo += src.numel()
    return pool, blocks


class TreeReads(torch.autograd.Function):
    """qt [S, H, C, K], lam_slots [S, H, C, L'], init [N, H, NI, K, V] or None, then the up-sweep's
    nodes[0..] and trans[0..] -> the reads of every height summed in the slot grid [S, H, C, V]."""

    @staticmethod
    def forward(ctx, qt, lam_slots, init, plan, log_c, *tree):
        nodes, trans = tree[: len(tree) // 2], tree[len(tree) // 2 :]
        out = qt.new_zeros(*qt.shape[:3], nodes[0].shape[-1])
        for r in plan.reads:
            pool, _ = _pool(r, nodes, trans, init, plan)
            weight = lam_slots[r.readers, :, :, log_c + 1 + r.height, None]
            out.index_add_(0, r.readers, weight * (qt[r.readers] @ pool[r.pos]))
        ctx.save_for_backward(qt, lam_slots, init, *tree)
        ctx.plan, ctx.log_c = plan, log_c
        return out

    @staticmethod
    def backward(ctx, d_out):
        qt, lam_slots, init, *tree = ctx.saved_tensors
        nodes, trans = tree[: len(tree) // 2], tree[len(tree) // 2 :]
        plan, N = ctx.plan, ctx.plan.num_docs
        d_qt, d_lam = torch.zeros_like(qt), torch.zeros_like(lam_slots)
        d_init = None if init is None else torch.zeros_like(init)
        d_tree = [torch.zeros_like(x) for x in tree]
        d_nodes, d_trans = d_tree[: len(tree) // 2], d_tree[len(tree) // 2 :]
        for r in plan.reads:
            pool, blocks = _pool(r, nodes, trans, init, plan)
            level = ctx.log_c + 1 + r.height
            q, d, weight = qt[r.readers], d_out[r.readers], lam_slots[r.readers, :, :, level, None]
            d_read = d @ pool[r.pos].transpose(-1, -2)  # [n, H, C, K]
            d_qt.index_add_(0, r.readers, weight * d_read)
            d_lam[r.readers, :, :, level] = (d_read * q).sum(-1)  # each reader once per height
            d_pool = torch.zeros_like(pool)
            d_pool.index_add_(0, r.pos, (weight * q).transpose(-1, -2) @ d)
            for (j, prev, src), (lo, hi) in zip(reversed(r.steps), reversed(blocks)):
                d_trans[j].index_add_(0, prev, d_pool[lo:hi] @ pool[src].transpose(-1, -2))
                d_pool.index_add_(0, src, trans[j][prev].transpose(-1, -2) @ d_pool[lo:hi])
            if r.node_rank.numel():
                d_nodes[r.height].index_add_(0, r.node_rank, d_pool[N : N + r.node_rank.numel()])
            if d_init is not None and r.height < init.shape[2]:
                d_init[:, :, r.height] += d_pool[:N]
        return d_qt, d_lam, d_init, None, None, *d_tree
