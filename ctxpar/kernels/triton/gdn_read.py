"""GDN stage 3 (counterpart: ``torch_chunked.read_tree``): every chunk's reads of tree nodes.

For each height h, the chunks with bit h set read their node carried to the chunk start
(gdn_tree.Read) with the queries carried there, Qt, weighed by lambda level log2 C + 1 + h. This
is one autograd Function with a hand-written backward, not autograd over torch ops: each height's
carried nodes fill one preallocated pool in place (autograd would copy the growing pool at every
step, or keep it), and the backward rebuilds the pool instead of storing it, so nothing of size
S log S is ever kept. The products are gdn_bmm's: gathered operands, batched over the height's
chunks, tf32 tensor cores for half-precision inputs.
"""

from __future__ import annotations

import torch

from ctxpar.kernels.triton.gdn_bmm import gather_bmm
from ctxpar.kernels.triton.gdn_tree import initial_node


def _pool(r, nodes, trans, init, plan, prec):
    """Height r.height's carried nodes [N + readers, H, K, V] and each step's rows lo, lo + 1, ..."""
    base = initial_node(init, r.height, nodes[0], plan.num_docs)
    count = plan.num_docs + r.node_rank.numel() + sum(src.numel() for _, _, src in r.steps)
    pool = base.new_empty(count, *base.shape[1:])
    pool[: plan.num_docs] = base
    lo = plan.num_docs + r.node_rank.numel()
    if r.node_rank.numel():
        pool[plan.num_docs : lo] = nodes[r.height][r.node_rank]
    blocks = []
    for j, prev, src in r.steps:
        rows = torch.arange(lo, lo + src.numel(), device=pool.device)
        gather_bmm(trans[j], prev, pool, src, pool, rows, prec=prec)  # sources lie before lo
        blocks.append(rows)
        lo += src.numel()
    return pool, blocks


def _weight(lam_slots, r, log_c):
    """[readers, H, C]: the readers' lambda at the level of height r.height's reads."""
    return lam_slots[r.readers, :, :, log_c + 1 + r.height].contiguous()


class TreeReads(torch.autograd.Function):
    """qt [S, H, C, K], lam_slots [S, H, C, L'], init [N, H, NI, K, V] or None, then the up-sweep's
    nodes[0..] and trans[0..] -> the reads of every height summed in the slot grid [S, H, C, V]."""

    @staticmethod
    def forward(ctx, qt, lam_slots, init, plan, log_c, prec, *tree):
        nodes, trans = tree[: len(tree) // 2], tree[len(tree) // 2 :]
        out = qt.new_zeros(*qt.shape[:3], nodes[0].shape[-1])
        for r in plan.reads:
            pool, _ = _pool(r, nodes, trans, init, plan, prec)
            gather_bmm(qt, r.readers, pool, r.pos, out, r.readers, prec=prec, mode="add",
                       weight=_weight(lam_slots, r, log_c))
        ctx.save_for_backward(qt, lam_slots, init, *tree)
        ctx.plan, ctx.log_c, ctx.prec = plan, log_c, prec
        return out

    @staticmethod
    def backward(ctx, d_out):
        qt, lam_slots, init, *tree = ctx.saved_tensors
        nodes, trans = tree[: len(tree) // 2], tree[len(tree) // 2 :]
        plan, prec, N = ctx.plan, ctx.prec, ctx.plan.num_docs
        d_out = d_out.contiguous()
        d_qt, d_lam = torch.zeros_like(qt), torch.zeros_like(lam_slots)
        d_init = None if init is None else torch.zeros_like(init)
        d_tree = [torch.zeros_like(x) for x in tree]
        d_nodes, d_trans = d_tree[: len(tree) // 2], d_tree[len(tree) // 2 :]
        for r in plan.reads:
            pool, blocks = _pool(r, nodes, trans, init, plan, prec)
            weight = _weight(lam_slots, r, ctx.log_c)
            # One product d_out @ node^T gives both: d_qt += weight * it, and lambda's gradient at
            # this level, rowsum(qt * it) (each reader once per height), neither stored apart.
            gather_bmm(d_out, r.readers, pool, r.pos, d_qt, r.readers, prec=prec, trans_b=True, mode="add",
                       weight=weight, dots=(qt, d_lam[..., ctx.log_c + 1 + r.height]))
            # Every pool row is one reader's, except initial nodes no reader takes as they are:
            # only those need zeros before the readers' gradients are stored.
            d_pool = torch.empty_like(pool)
            d_pool[:N].zero_()
            gather_bmm(qt, r.readers, d_out, r.readers, d_pool, r.pos, prec=prec, trans_a=True, k_weight=weight)
            for (j, prev, src), rows in zip(reversed(r.steps), reversed(blocks)):
                gather_bmm(d_pool, rows, pool, src, d_trans[j], prev, prec=prec, trans_b=True, mode="add")
                gather_bmm(trans[j], prev, d_pool, rows, d_pool, src, prec=prec, trans_a=True, mode="atomic")
            if r.node_rank.numel():
                d_nodes[r.height].index_add_(0, r.node_rank, d_pool[N : N + r.node_rank.numel()])
            if d_init is not None and r.height < init.shape[2]:
                d_init[:, :, r.height] += d_pool[:N]
        return d_qt, d_lam, d_init, None, None, None, *d_tree
