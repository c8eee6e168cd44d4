"""The gradient of g, summed where it is well conditioned.

G_t - G_s = sum of g_r over s < r <= t, so dg_r is the sum of the pair terms
A_ts = lam exp(G_t - G_s) (q_t . k_s)(do_t . v_s) over the pairs that straddle r. Summing the
per-token q.dq - k.dk backwards over the document gives the same number mathematically, but those
per-token terms are far larger than the result and their rounding random-walks over a million
tokens. Here every share is a sum of straddling pairs only:

- inside r's chunk c (the kernels): pairs with both ends in c (query_grad), node reads of c's
  queries t >= r (query_grad), c's sources s < r towards later queries (source_grad);
- pairs with both ends outside c (``straddle`` below, per chunk): an up-sweep transport whose right
  child holds c (tree.down_sweep's ys), and a node read by a later chunk of c's height-h block
  whose carry crosses c (query_grad's xs).
"""

from __future__ import annotations

import torch


def straddle(xs, ys, layout):
    """[S, H] f32: for each chunk, the pairs with the source before it and the query after it.

    xs, ys [S, H, NH]: chunk i's node reads at height h (their carry spans the chunks of i's
    height-h block before i) and the transport at height h whose parent ends at slot i (its right
    child is the height-h block ending there).
    """
    S, H, NH = xs.shape
    doc = layout.slot_doc.long()
    c, c0, c_last, first = layout.slot_chunk, layout.docs[doc, 3], layout.docs[doc, 4], layout.docs[doc, 5]
    h = torch.arange(NH, device=xs.device)
    live = ((c[:, None] >> h) & 1) == 1  # c sits in the right child at height h
    block_end = c[:, None] | ((1 << h) - 1)
    end_slot = first[:, None] + torch.minimum(block_end, c_last[:, None]) - c0[:, None]  # [S, NH]
    index = end_slot[:, None, :].expand(S, H, NH)

    has_parent = live & (block_end <= c_last[:, None])
    up = ys.gather(0, index).where(has_parent[:, None, :], 0)
    # Scanned along the last dim: a scan over dim 0 of [S, H, NH] runs on H * NH threads.
    suffix = xs.double().flip(0).permute(1, 2, 0).cumsum(-1).permute(2, 0, 1).flip(0)
    after = torch.cat([suffix, xs.new_zeros(1, H, NH, dtype=torch.float64)])
    reads = after[1:] - after.gather(0, index + 1)  # reads by slots i + 1 .. end of i's block
    reads = reads.where(live[:, None, :], 0)
    return (up.double().sum(-1) + reads.sum(-1)).float()
