"""The local pieces of the CP op that the one-device backends do not expose, built from the chunkwise
torch backend's stages: a piece's summary (its own state and the product of its transitions) and
what its queries read from the Fenwick state that arrives from the ranks before.

Every tensor here is canonical (``ctxpar.kernels.inputs``) and laid out ``[R, H, n, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctxpar.kernels.levels import level_of, live_bits
from ctxpar.kernels.torch_chunked import DEFAULT_CHUNK, build_tree, chunk_stage, final_buckets, transport


@dataclass
class Boundary:
    buckets: torch.Tensor  # [R, H, bit_length(t0 + n), K, V]: the state after the piece, from a zero state at t0
    trans: torch.Tensor  # [R, H, k, k]: the product of the piece's transitions
    queries: torch.Tensor | None  # [R, H, n, K]: each query carried back to t0 (q_t^T A_t ... A_t0)


def boundary(q, k, v, g, beta, t0: int, with_queries: bool, chunk_size: int = DEFAULT_CHUNK) -> Boundary:
    """One pass of the chunk stage gives all three; the outputs are the backend's job."""
    C, n = chunk_size, q.shape[2]
    log_c = C.bit_length() - 1
    front, back = t0 % C, -(t0 + n) % C
    chunks = lambda x: F.pad(x, (0, 0, front, back)).unflatten(2, (-1, C))  # noqa: E731  zero tokens are identities
    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    gc = F.pad(g, (front, back)).unflatten(2, (-1, C))
    bc = None if beta is None else F.pad(beta, (front, back)).unflatten(2, (-1, C))
    stage = chunk_stage(qc, kc, vc, gc, bc)
    c0, t_end = t0 // C, t0 + n
    last = max(c0 + qc.shape[2] - 1, t_end // C)
    tree = build_tree(stage["U"], stage["M"], c0, last.bit_length(), None, log_c)
    buckets = final_buckets(tree, stage, vc, t0, t_end, c0, None, C)
    through = _inclusive_products(stage["M"])  # [R, H, NC, k, k]: M_c ... M_c0
    queries = None
    if with_queries:
        before = torch.cat([_identity(through[:, :, :1]), through[:, :, :-1]], dim=2)
        carried = stage["Qt"] @ before if before.shape[-1] > 1 else stage["Qt"] * before
        queries = carried.flatten(2, 3)[:, :, front : front + n]
    return Boundary(buckets, through[:, :, -1], queries)


def _inclusive_products(m: torch.Tensor) -> torch.Tensor:
    """Prefix products along dim 2 by recursive doubling (log NC batched steps, not NC serial ones)."""
    step = 1
    while step < m.shape[2]:
        m = torch.cat([m[:, :, :step], transport(m[:, :, step:], m[:, :, :-step])], dim=2)
        step *= 2
    return m


def _identity(like: torch.Tensor) -> torch.Tensor:
    if like.shape[-1] == 1:
        return torch.ones_like(like)
    return torch.eye(like.shape[-1], dtype=like.dtype, device=like.device).expand_as(like)


def state_reads(queries: torch.Tensor, lam: torch.Tensor, t0: int, state: torch.Tensor) -> torch.Tensor:
    """What queries at t0, t0+1, ... read from the Fenwick state after t0 tokens ([R, H, n, V]).

    Query t reads the bucket of bit j at level bit_length(t XOR lo_j) = max(j + 1, bit_length(t XOR t0)):
    where t still agrees with t0 above bit j the bucket is its own level j + 1, else the highest
    differing bit decides for every lower bucket alike.
    """
    n = queries.shape[2]
    positions = torch.arange(t0, t0 + n, device=queries.device)
    above = level_of(positions, t0)
    out = 0
    for bit in live_bits(t0):
        level = above.clamp(min=bit + 1).expand(*lam.shape[:2], n)
        weight = lam.gather(-1, level[..., None])
        out = out + weight * (queries @ state[:, :, bit])
    return out
