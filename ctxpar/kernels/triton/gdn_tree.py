"""GDN stage 2 (counterparts: ``torch_chunked.build_tree`` + ``read_tree``): the tree over chunks.

Why torch here: across chunks every step is a batched [K, K] @ [K, K or V] product, one launch per
tree height with every node of that height in the batch, and the up-sweep touches each node once
(S products in all), so plain torch products differentiated by autograd are enough; the reads,
O(S log S) products, have their own kernels (gdn_read.py, gdn_bmm.py).

Nodes use the layout's Fenwick numbering (layout.py): the node of height h ending at chunk c is
slot c's once ones(c) >= h. ``nodes[h]`` / ``trans[h]`` hold the states / transitions at height h
of the slots with ones >= h, in ``by_height`` order (a prefix of it), so each height is one
gather and one batched product and no array is ever updated in place. A left child before the
document's first chunk is the initial state's node of that height, with identity transition
(its content is already carried to t0).

Chunk c reads, at each set bit h, the node ending at a - 1 (a = c with its low h bits cleared)
carried to c's start: X(c) = trans of slot c - 1 (height tz(c)) @ X(c - 2^tz(c)), X(a) = the node.
Sources have more trailing zeros than their targets, so one batched product per tz fills a pool
of the height's carried nodes in order (``Read``; gdn_read.py runs them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxpar.kernels.triton.layout import trailing_ones


@dataclass
class Read:
    """Height h's reads: slots ``readers`` read pool[pos]; the pool starts with the N initial
    nodes, then ``nodes[h][node_rank]``, then one block per step (tz j, rank of each target's
    slot c - 1 in trans[j], source pos), in that order."""

    height: int
    readers: torch.Tensor
    pos: torch.Tensor
    node_rank: torch.Tensor
    steps: list


class TreePlan:
    """Host-built index tables of the up-sweep and the reads (device tensors)."""

    def __init__(self, layout, device):
        doc, chunk, order = (layout.host[x] for x in ("slot_doc", "slot_chunk", "by_height"))
        c0, first = torch.tensor(layout.c0)[doc], torch.tensor(layout.first_slot)[doc]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        self.layout, self.num_docs, self.rank_host = layout, layout.num_docs, rank
        self.has_front = any(layout.c0)  # some left child lies before its document's first chunk
        self.order, self.rank = order.to(device), rank.to(device)
        self.up = []  # per height: (parents, index of each left child in cat(nodes[h], initial nodes))
        for h in range(layout.heights):
            right = order[: layout.at_least[h + 1]]
            if right.numel() == 0:
                break
            inside = chunk[right] - (1 << h) >= c0[right]
            left = torch.where(inside, rank[(right - (1 << h)).clamp(min=0)], layout.at_least[h] + doc[right])
            self.up.append((right.numel(), left.to(device)))
        self.reads = [r for h in range(layout.heights) if (r := self._read(h, doc, chunk, c0, first, device))]

    def _read(self, h, doc, chunk, c0, first, device):
        readers = ((chunk >> h) & 1).nonzero().flatten()
        if readers.numel() == 0:
            return None
        c, cz = chunk[readers], c0[readers]
        a = (c >> h) << h
        base = ((c & ((1 << h) - 1)) == 0) | (c == cz)  # X = the node itself
        in_slots = base & (a - 1 >= cz)
        pos = torch.full_like(chunk, -1)
        pos[readers[base & ~in_slots]] = doc[readers[base & ~in_slots]]
        pos[readers[in_slots]] = self.num_docs + torch.arange(int(in_slots.sum()))
        node_rank = self.rank_host[first[readers[in_slots]] + a[in_slots] - 1 - cz[in_slots]]
        size = self.num_docs + node_rank.numel()
        tz = trailing_ones(c - 1)
        steps = []
        for j in reversed(range(h)):
            sel = readers[~base & (tz == j)]
            if sel.numel() == 0:
                continue
            src_in = chunk[sel] - (1 << j) >= c0[sel]
            src = torch.where(src_in, pos[(sel - (1 << j)).clamp(min=0)], doc[sel])
            pos[sel] = size + torch.arange(sel.numel())
            size += sel.numel()
            steps.append((j, self.rank_host[sel - 1].to(device), src.to(device)))
        return Read(h, readers.to(device), pos[readers].to(device), node_rank.to(device), steps)

    def slot_rank(self, n, chunk):
        """Position of document n's chunk in the by_height order (host int)."""
        return int(self.rank_host[self.layout.first_slot[n] + chunk - self.layout.c0[n]])


def initial_node(init, h, like, num_docs):
    """[N, H, K, V]: the initial state's node of height h (zeros where it has none)."""
    if init is None or h >= init.shape[2]:
        return like.new_zeros(num_docs, *like.shape[1:])
    return init[:, :, h]


def up_sweep(u, m, init, plan):
    """Chunk end states u [S, H, K, V] and transitions m [S, H, K, K] -> (nodes, trans) per height.
    init: [N, H, NI, K, V] initial-state nodes (height h at index h) or None."""
    nodes, trans = [u[plan.order]], [m[plan.order]]
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype).expand(plan.num_docs, m.shape[1], -1, -1)
    for h, (count, left) in enumerate(plan.up):
        right_m = trans[h][:count]
        # Documents that all start at chunk 0 have every left child in a slot: no initial-node pool.
        front = plan.has_front
        states = torch.cat([nodes[h], initial_node(init, h, u, plan.num_docs)]) if front else nodes[h]
        left_m = torch.cat([trans[h], eye]) if front else trans[h]
        nodes.append(right_m @ states[left] + nodes[h][:count])
        trans.append(right_m @ left_m[left])
    return nodes, trans


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
