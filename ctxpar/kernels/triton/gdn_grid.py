"""Token rows <-> the slot grid [S, H, C, ...] of the GDN stages (differentiable gathers).

Slot i of the layout (chunk c of document n) holds absolute positions c C .. c C + C - 1 of n; the
positions before t0 or past the document's end are zero tokens (g = 0, beta = 0: identity
transitions), exactly the padding of ``torch_chunked``. Every token row lies in one slot.
"""

from __future__ import annotations

import torch

from ctxpar.kernels import torch_chunked


class SlotGrid:
    def __init__(self, layout, num_rows, heads, qk_heads, device):
        C = layout.chunk
        doc, chunk = layout.host["slot_doc"], layout.host["slot_chunk"]
        start, t0, length = (torch.tensor(x)[doc] for x in (layout.token_start, layout.starts, layout.lengths))
        pos = chunk[:, None] * C + torch.arange(C)  # [S, C] absolute positions
        real = (pos >= t0[:, None]) & (pos < (t0 + length)[:, None])
        rows = torch.where(real, start[:, None] + pos - t0[:, None], num_rows).flatten()  # num_rows: a zero row
        inverse = torch.empty(num_rows, dtype=torch.int64)
        inverse[rows[real.flatten()]] = torch.arange(rows.numel())[real.flatten()]
        self.layout, self.chunk, self.num_slots = layout, C, doc.numel()
        self.index, self.inverse = rows.to(device), inverse.to(device)
        self.heads_of = (torch.arange(heads) // (heads // qk_heads)).to(device)

    def tokens(self, x, expand=False, slots=None):
        """[rows, Hx, ...] -> [S, H, C, ...] (or only ``slots``, a list); ``expand`` maps the Hk
        q/k groups to the H heads."""
        index = self.index if slots is None else self.index.view(self.num_slots, -1)[slots].flatten()
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]
        if expand:
            x = x[:, self.heads_of]
        return x.unflatten(0, (-1, self.chunk)).transpose(1, 2)

    def rows(self, y):
        """[S, H, C, ...] -> [rows, H, ...]."""
        return y.transpose(1, 2).flatten(0, 1)[self.inverse]


def torch_stage(q, k, v, g, beta, lam, grid):
    """``gdn_chunk.chunk_stage``'s outputs from ``torch_chunked`` (float32): the per-stage reference
    of the chunk stage and, through autograd, of its backward."""
    log_c = grid.chunk.bit_length() - 1
    lam = torch.nn.functional.pad(lam, (0, max(0, log_c + 1 - lam.shape[-1])))
    per_chunk = lambda x, expand=False: grid.tokens(x.float(), expand).transpose(0, 1)[None]  # noqa: E731
    qc, kc = per_chunk(q, True), per_chunk(k, True)
    vc, gc, bc, lc = (per_chunk(x) for x in (v, g, beta, lam))
    stage = torch_chunked.chunk_stage(qc, kc, vc, gc, bc)
    o = torch_chunked.intra_output(stage["P"], lc, vc)
    return tuple(x[0].transpose(0, 1) for x in (o, stage["Qt"], stage["U"], stage["M"]))
