"""Per-token work in token tiles, each checkpointed, so backward holds one tile's intermediates.

Everything in a block but the short conv and the log-linear op treats tokens independently: the
norms, projections, gates and the SwiGLU. Inside a checkpointed block's recomputation those parts
would otherwise hold full-length float32 norm intermediates and [T, 2 x 2816] MLP activations all
at once; run per tile under a nested (non-reentrant) checkpoint, a tile's intermediates exist only
while that tile is recomputed in backward. The price is one more forward of the per-token parts.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def token_tiled(fn, *xs, tile: int | None):
    """``fn(*xs)`` for per-token ``fn`` over [B, T, ...] tensors, computed ``tile`` tokens at a time
    under checkpoint and concatenated along T; ``tile=None``: one plain call.

    The tiles come from one ``split`` (not one slice per tile), so backward gathers the tiles'
    input gradients in one concatenation instead of a full-size zero tensor per tile.
    """
    if tile is None:
        return fn(*xs)
    parts = [checkpoint(fn, *tiles, use_reentrant=False) for tiles in zip(*(x.split(tile, dim=1) for x in xs))]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(outs, dim=1) for outs in zip(*parts))
    return torch.cat(parts, dim=1)
