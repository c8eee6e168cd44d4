"""The local pieces of the CP op that the one-device backends do not expose: how the piece that
crosses in carries its queries back to its first token (and the product of its transitions), and
what those queries read from the Fenwick state that arrives from the ranks before.

A piece's own summary is not here: it is the local op's final state from a zero state at the
piece's first token, so no rank computes its states twice.

Tensors are token-major ``[R, n, ...]`` slices of the native canonical form
(``ctxpar.kernels.inputs``): q, k keep their Hk groups and their input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctxpar.kernels import state_reads
from ctxpar.kernels.levels import level_of, live_bits
from ctxpar.kernels.torch_chunked import DEFAULT_CHUNK, chunk_stage, transport


@dataclass
class Carry:
    trans: torch.Tensor  # [R, H, k, k]: the product of the piece's transitions
    queries: torch.Tensor  # [R, n, Hq, K]: q_t^T A_t ... A_t0 (Mamba-2: q itself, Hq = Hk; decay apart)
    decay: torch.Tensor | None  # [R, n, H]: Mamba-2's scalar A_t ... A_t0 (None for GDN)


def carry(q, k, v, g, beta, t0: int, chunk_size: int = DEFAULT_CHUNK) -> Carry:
    """q, k [R, n, Hk, K], v [R, n, H, V], g, beta [R, n, H]: one piece, token-major."""
    if beta is None:
        # Scalar transitions: a cumulative sum, in float64 so that 1M-token sums keep their digits.
        running = _prefix_sum(g.double().transpose(1, 2)).transpose(1, 2)
        decay = running.exp().to(torch.promote_types(g.dtype, torch.float32))
        return Carry(decay[:, -1, :, None, None], q, decay)
    heads = lambda x: x.transpose(1, 2)  # noqa: E731  the torch backend's [R, H, n, ...]
    expanded = [heads(_expanded(x, v.shape[2])) for x in (q, k, v)]
    return _delta_carry(*expanded, heads(g), heads(beta), t0, chunk_size)


def _prefix_sum(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Inclusive cumsum along the last dim in two levels (inside blocks, then over block totals):
    torch scans each row on one thread block, and R x H rows of 512K tokens took 6.9 ms for the
    scan and its backward in a profile of a 1M-token CP step (an H200 that another process
    shared)."""
    n = x.shape[-1]
    blocks = F.pad(x, (0, -n % block)).unflatten(-1, (-1, block)).cumsum(-1)
    totals = blocks[..., -1].cumsum(-1) - blocks[..., -1]
    return (blocks + totals[..., None]).flatten(-2)[..., :n]


def _expanded(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Hk groups to H heads in the compute dtype (the torch backend's form)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return x.to(compute).repeat_interleave(heads // x.shape[2], dim=2)


def _delta_carry(q, k, v, g, beta, t0, chunk_size) -> Carry:
    """Gated DeltaNet ([R, H, n, ...] inputs): the torch backend's chunk stage gives each chunk's
    carried queries and transition; prefix products over chunks carry them to t0."""
    C, n = chunk_size, q.shape[2]
    front, back = t0 % C, -(t0 + n) % C
    chunks = lambda x: F.pad(x, (0, 0, front, back)).unflatten(2, (-1, C))  # noqa: E731  zero tokens are identities
    row = lambda x: F.pad(x.to(q.dtype), (front, back)).unflatten(2, (-1, C))  # noqa: E731
    stage = chunk_stage(chunks(q), chunks(k), chunks(v), row(g), row(beta))
    through = _inclusive_products(stage["M"])  # [R, H, NC, K, K]: M_c ... M_c0
    eye = torch.eye(through.shape[-1], dtype=through.dtype, device=through.device)
    before = torch.cat([eye.expand_as(through[:, :, :1]), through[:, :, :-1]], dim=2)
    queries = (stage["Qt"] @ before).flatten(2, 3)[:, :, front : front + n]
    return Carry(through[:, :, -1], queries.transpose(1, 2), None)


def _inclusive_products(m: torch.Tensor) -> torch.Tensor:
    """Prefix products along dim 2 by recursive doubling (log NC batched steps, not NC serial ones)."""
    step = 1
    while step < m.shape[2]:
        m = torch.cat([m[:, :, :step], transport(m[:, :, step:], m[:, :, :-step])], dim=2)
        step *= 2
    return m


def add_state_reads(o: torch.Tensor, c: Carry, lam: torch.Tensor, t0: int, state: torch.Tensor) -> torch.Tensor:
    """o [R, n, H, V] plus what queries at t0, t0+1, ... read from the Fenwick state after t0
    tokens (state [R, H, nbits, K, V]); lam [R, n, H, L].

    Query t reads the bucket of bit j at level bit_length(t XOR lo_j) = max(j + 1, bit_length(t XOR t0)):
    where t still agrees with t0 above bit j the bucket is its own level j + 1, else the highest
    differing bit decides for every lower bucket alike.
    """
    R, n, H = lam.shape[:3]
    bits = live_bits(t0)
    above = level_of(torch.arange(t0, t0 + n, device=lam.device), t0)
    levels = torch.stack([above.clamp(min=b + 1) for b in bits], dim=1)  # [n, nb]
    w = lam.gather(-1, levels[None, :, None, :].expand(R, n, H, len(bits))).to(state.dtype)
    if c.decay is not None:
        w = w * c.decay[..., None].to(state.dtype)
    buckets = torch.stack([state[:, :, b] for b in bits], dim=2)  # slices: a host index list would sync
    return state_reads.add_state_reads(o, c.queries, w, buckets)
