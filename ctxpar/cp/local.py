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
from ctxpar.kernels.levels import live_bits, read_levels
from ctxpar.kernels.torch_chunked import DEFAULT_CHUNK, chunk_stage, transport


@dataclass
class Carry:
    trans: torch.Tensor  # [R, H, k, k]: the product of the piece's transitions
    queries: torch.Tensor  # [R, n, Hq, K]: q_t^T A_t ... A_t0 (Mamba-2: q itself, Hq = Hk; decay apart)
    decay: torch.Tensor | None  # [R, n, H]: Mamba-2's scalar A_t ... A_t0 (None for GDN)


def carry(q, k, v, g, beta, t0: int, chunk_size: int = DEFAULT_CHUNK) -> Carry:
    """q, k [R, n, Hk, K], v [R, n, H, V], g, beta [R, n, H]: one piece, token-major."""
    if beta is None:
        decay = _decay(g.to(torch.promote_types(g.dtype, torch.float32)))
        return Carry(decay[:, -1, :, None, None], q, decay)
    heads = lambda x: x.transpose(1, 2)  # noqa: E731  the torch backend's [R, H, n, ...]
    expanded = [heads(_expanded(x, v.shape[2])) for x in (q, k, v)]
    return _delta_carry(*expanded, heads(g), heads(beta), t0, chunk_size)


def _decay(g: torch.Tensor, block: int = 64) -> torch.Tensor:
    """exp(g_0 + ... + g_t) for every t along dim 1 of g [R, n, H], as exp(the sum inside t's block
    of ``block`` tokens) times exp(the sums of the blocks before, added in float64): a million-token
    sum keeps its digits where the decay is not negligible, and every pass over the [R, n, H]
    tensor stays in g's dtype. (A float64 scan of the whole tensor and its backward took about 1 ms
    of a 512K-token-per-GPU CP step on an H200.)"""
    n = g.shape[1]
    inside = F.pad(g, (0, 0, 0, -n % block)).unflatten(1, (-1, block)).cumsum(2)  # [R, blocks, block, H]
    # Scanned along the last dim: a scan along dim 1 of [R, blocks, H] runs on R * H threads (3 ms).
    totals = inside[:, :, -1].double().transpose(1, 2).cumsum(-1).transpose(1, 2)
    before = torch.cat([torch.zeros_like(totals[:, :1]), totals[:, :-1]], dim=1).exp().to(g.dtype)
    return (inside.exp() * before[:, :, None]).flatten(1, 2)[:, :n]


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


def pick_scales(lam: torch.Tensor, n: int, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam itself, for the local op; [R, n, H, nb] the scales at which its first n queries, at
    positions t0, t0 + 1, ..., read each live bucket of the state after t0 tokens).

    The levels of a bucket's reads form a few runs of queries (``levels.read_levels``: one when t0
    is a multiple of n's power of two), so the scales are slices of lam's level axis, not a gather.
    """
    return _PickScales.apply(lam, [read_levels(t0, n, b) for b in live_bits(t0)])


class _PickScales(torch.autograd.Function):
    """lam and its slices at each bucket's runs of levels. Backward adds the scales' gradient into
    those slices of the op's lambda gradient in place: a plain slice or gather made a lambda-sized
    zero gradient and added it to the op's. On an H200 at 512K tokens per GPU the slices cost 0.18
    ms forward and 0.35 ms backward (a gather and a scatter_add: 0.18 and 0.45): the level axis is
    innermost, so every pass touches a sector of lambda per token and head. The op's lambda
    gradient is a buffer its backward made (the Triton op's, seen through a reshape), or a slice of
    one (the torch backend pads lambda): a slice, or anything not contiguous, is copied first,
    since its memory may hold more than this gradient."""

    @staticmethod
    def forward(ctx, lam, runs):
        ctx.runs = runs
        buckets = [torch.cat([lam[:, a:e, :, level] for a, e, level in bucket], dim=1) for bucket in runs]
        return lam.view_as(lam), torch.stack(buckets, dim=-1)

    @staticmethod
    def backward(ctx, d_lam, d_scales):
        whole = d_lam._base is None or d_lam._base.numel() == d_lam.numel()
        if not (whole and d_lam.is_contiguous()):
            d_lam = d_lam.clone()
        for j, bucket in enumerate(ctx.runs):
            for a, e, level in bucket:
                d_lam[:, a:e, :, level] += d_scales[:, a:e, :, j]
        return d_lam, None


def add_state_reads(o: torch.Tensor, c: Carry, scales: torch.Tensor, t0: int, state: torch.Tensor) -> torch.Tensor:
    """o [R, n, H, V] plus what queries at t0, t0+1, ... read from the Fenwick state after t0
    tokens (state [R, H, nbits, K, V]), each live bucket weighed by ``scales`` [R, n, H, nb]
    (``pick_scales``) and Mamba-2's decay."""
    w = scales.to(state.dtype)
    if c.decay is not None:
        w = w * c.decay[..., None].to(state.dtype)
    buckets = torch.stack([state[:, :, b] for b in live_bits(t0)], dim=2)  # slices: a host index list would sync
    return state_reads.add_state_reads(o, c.queries, w, buckets)
