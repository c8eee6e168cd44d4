"""GDN stage 2 (counterparts: ``torch_chunked.build_tree`` + ``read_tree``): the tree over chunks.

Across chunks every step is a batched [K, K] @ [K, K or V] product, one launch per tree height
with every node of that height in the batch (gdn_bmm's gathered products, on tensor cores for
half-precision inputs); the up-sweep is one autograd Function with its own backward, which needs
nothing but the tree (autograd over torch ops would keep a gathered copy of every left child).

Nodes use the layout's Fenwick numbering (layout.py): the node of height h ending at chunk c is
slot c's once ones(c) >= h. ``nodes[h]`` / ``trans[h]`` hold the states / transitions at height h
of the slots with ones >= h, in ``by_height`` order (a prefix of it), so that the parents of a
height are the first entries of its children's array and nothing is updated in place. A left
child before the document's first chunk is the initial state's node of that height, with
identity transition (its content is already carried to t0).

Chunk c reads, at each set bit h, the node ending at a - 1 (a = c with its low h bits cleared),
carried to c's start through the nodes it reads below h (gdn_carry.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxpar.kernels.triton.gdn_bmm import gather_bmm


@dataclass
class Up:
    """Height h -> h + 1 of the up-sweep: the parents are the first ``count`` entries of nodes[h]
    (their right children); ``inner`` of them have their left child at ``inner_left`` in nodes[h],
    ``front`` ones the initial node of document ``front_doc``."""

    count: int
    inner: torch.Tensor
    inner_left: torch.Tensor
    front: torch.Tensor
    front_doc: torch.Tensor


class TreePlan:
    """Host-built index tables of the up-sweep and the reads (device tensors)."""

    def __init__(self, layout, device):
        doc, chunk, order = (layout.host[x] for x in ("slot_doc", "slot_chunk", "by_height"))
        c0 = torch.tensor(layout.c0)[doc]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        self.layout, self.num_docs, self.rank_host = layout, layout.num_docs, rank
        self.rank = rank.to(device)
        self.up = []
        for h in range(layout.heights):
            right = order[: layout.at_least[h + 1]]
            if right.numel() == 0:
                break
            inside = chunk[right] - (1 << h) >= c0[right]
            parents = torch.arange(right.numel())
            dev = lambda x: x.to(device)  # noqa: E731
            self.up.append(Up(right.numel(), dev(parents[inside]), dev(rank[right[inside] - (1 << h)]),
                              dev(parents[~inside]), dev(doc[right[~inside]])))
        # The reads' tables (gdn_carry.py): the joined tree's first row of each height, and
        # each (slot, height) read's row among all reads (-1: no read), at every set bit of the
        # chunk (reads of initial nodes included, read or not).
        sizes = torch.tensor([layout.at_least[h] for h in range(len(self.up) + 1)])
        self.node_offsets = (torch.cumsum(sizes, 0) - sizes).to(device)
        bits = (chunk[:, None] >> torch.arange(layout.heights)) & 1
        self.read_row = torch.where(bits == 1, torch.cumsum(bits.flatten(), 0).view_as(bits) - 1, -1).to(device)
        self.num_reads = int(bits.sum())

    def slot_rank(self, n, chunk):
        """Position of document n's chunk in the by_height order (host int)."""
        return int(self.rank_host[self.layout.first_slot[n] + chunk - self.layout.c0[n]])


def initial_node(init, h, like, num_docs):
    """[N, H, K, V]: the initial state's node of height h (zeros where it has none)."""
    if init is None or h >= init.shape[2]:
        return like.new_zeros(num_docs, *like.shape[1:])
    return init[:, :, h]


def up_sweep(u, m, init, plan, prec):
    """Chunk end states u [S, H, K, V] and transitions m [S, H, K, K], in by_height order (row
    plan.rank[i] for slot i: the chunk stage writes them so) -> (nodes, trans) per height.
    init: [N, H, NI, K, V] initial-state nodes (height h at index h) or None."""
    tree = UpSweep.apply(u, m, init, plan, prec)
    return list(tree[: len(tree) // 2]), list(tree[len(tree) // 2 :])


class UpSweep(torch.autograd.Function):
    """parent = M_right @ left + right, M_parent = M_right @ M_left, one height at a time, as
    gdn_bmm products (tensor cores for half-precision inputs); the backward walks the heights top
    down and needs only the tree itself, which the reads keep anyway."""

    @staticmethod
    def forward(ctx, u, m, init, plan, prec):
        nodes, trans = [u], [m]
        for h, up in enumerate(plan.up):
            node, tr = nodes[h][: up.count].clone(), torch.empty_like(trans[h][: up.count])
            gather_bmm(trans[h], up.inner, nodes[h], up.inner_left, node, up.inner, prec=prec, mode="add")
            gather_bmm(trans[h], up.inner, trans[h], up.inner_left, tr, up.inner, prec=prec)
            if up.front.numel():  # left child: an initial node, carried to t0 already (identity)
                if init is not None:
                    start = initial_node(init, h, u, plan.num_docs).contiguous()
                    gather_bmm(trans[h], up.front, start, up.front_doc, node, up.front, prec=prec, mode="add")
                tr[up.front] = trans[h][up.front]
            nodes.append(node)
            trans.append(tr)
        ctx.save_for_backward(init, *nodes, *trans)
        ctx.plan, ctx.prec = plan, prec
        return (*nodes, *trans)

    @staticmethod
    def backward(ctx, *grads):
        init, *tree = ctx.saved_tensors
        plan, prec, half = ctx.plan, ctx.prec, len(tree) // 2
        nodes, trans = tree[:half], tree[half:]
        # The incoming gradients are this node's own buffers: accumulated into in place.
        d_nodes, d_trans = [g.contiguous() for g in grads[:half]], [g.contiguous() for g in grads[half:]]
        d_init = None if init is None else torch.zeros_like(init)
        for h in reversed(range(len(plan.up))):
            up, d_parent, d_parent_m = plan.up[h], d_nodes[h + 1], d_trans[h + 1]
            d_nodes[h][: up.count] += d_parent
            rows, left = up.inner, up.inner_left  # left children (ones = h) never are parents (ones > h)
            gather_bmm(d_parent, rows, nodes[h], left, d_trans[h], rows, prec=prec, trans_b=True, mode="add")
            gather_bmm(d_parent_m, rows, trans[h], left, d_trans[h], rows, prec=prec, trans_b=True, mode="add")
            gather_bmm(trans[h], rows, d_parent, rows, d_nodes[h], left, prec=prec, trans_a=True, mode="add")
            gather_bmm(trans[h], rows, d_parent_m, rows, d_trans[h], left, prec=prec, trans_a=True, mode="add")
            if up.front.numel():
                d_trans[h].index_add_(0, up.front, d_parent_m[up.front])
            if up.front.numel() and init is not None:
                start = initial_node(init, h, nodes[0], plan.num_docs).contiguous()
                gather_bmm(d_parent, up.front, start, up.front_doc, d_trans[h], up.front, prec=prec, trans_b=True,
                           mode="add")
                if h < init.shape[2]:
                    d_start = torch.zeros_like(start)
                    gather_bmm(trans[h], up.front, d_parent, up.front, d_start, up.front_doc, prec=prec, trans_a=True,
                               mode="add")
                    d_init[:, :, h] += d_start
        return d_nodes[0], d_trans[0], d_init, None, None


def carried_node(nodes, trans, init, plan, n, ce, h):
    """[H, K, V]: document n's node ((ce >> h) - 1, h) carried to the start of chunk ce."""
    a = (ce >> h) << h
    c0 = plan.layout.c0[n]
    x = nodes[h][plan.slot_rank(n, a - 1)] if a - 1 >= c0 else initial_node(init, h, nodes[0], plan.num_docs)[n]
    for low in reversed(range(h)):
        end = ((ce >> low) << low) - 1
        if (ce >> low) & 1 and end >= c0:
            x = trans[low][plan.slot_rank(n, end)] @ x
    return x
