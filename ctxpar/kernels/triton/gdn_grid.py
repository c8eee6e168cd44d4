"""Token rows -> the slot grid [S, H, C, ...] of the GDN stages (a differentiable gather).

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
        self.index = rows.to(device)
        self.heads_of = (torch.arange(heads) // (heads // qk_heads)).to(device)
        # The same maps between [rows * H] and [S * H * C] (one gather each way, no copies of
        # transposed views): the source of every grid position (padded ones read row 0, then are
        # zeroed), and the grid position of every (row, head), for the gradient.
        head = torch.arange(heads)[None, :, None]
        grid_rows = rows.view(-1, 1, C)
        self.grid_source = torch.where(grid_rows < num_rows, grid_rows * heads + head, 0).flatten().to(device)
        self.grid_pads = torch.nonzero((grid_rows == num_rows).expand(-1, heads, -1).flatten())[:, 0].to(device)
        slot, offset = inverse[:, None] // C, inverse[:, None] % C
        self.row_source = ((slot * heads + torch.arange(heads)) * C + offset).flatten().to(device)

    def tokens(self, x, expand=False, slots=None):
        """[rows, Hx, ...] -> [S, H, C, ...] (or only ``slots``, a list); ``expand`` maps the Hk
        q/k groups to the H heads."""
        if not expand and slots is None:
            return Regrid.apply(x, self)
        index = self.index if slots is None else self.index.view(self.num_slots, -1)[slots].flatten()
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]
        if expand:
            x = x[:, self.heads_of]
        return x.unflatten(0, (-1, self.chunk)).transpose(1, 2)

    def _slots(self, x):
        flat = x.reshape(-1, *x.shape[2:]).index_select(0, self.grid_source).index_fill_(0, self.grid_pads, 0)
        return flat.view(self.num_slots, x.shape[1], self.chunk, *x.shape[2:])

    def _rows(self, y):
        return y.reshape(-1, *y.shape[3:]).index_select(0, self.row_source).view(-1, y.shape[1], *y.shape[3:])


class Regrid(torch.autograd.Function):
    """SlotGrid.tokens of every slot. Each token row sits at one slot position, so the gather's
    adjoint is the gather the other way (autograd's backward of an index scatters with
    accumulation: a sort on the GPU); padded positions get no gradient."""

    @staticmethod
    def forward(ctx, x, grid):
        ctx.grid = grid
        return grid._slots(x)

    @staticmethod
    def backward(ctx, d):
        return ctx.grid._rows(d), None


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
