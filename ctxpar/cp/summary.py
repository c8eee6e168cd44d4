"""Summaries as tensors: the Fenwick combine of adjacent pieces of a document, and their wire form.

A summary of span [a, b) is ``buckets [R, H, len(bits), K, V]`` (the buckets of the state after b
that meet [a, b), from those tokens only) and, when a > 0, ``trans [R, H, k, k]``: the product of
the span's transitions (k = 1 for Mamba-2's scalar decay, K for Gated DeltaNet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxpar.cp.plan import Span
from ctxpar.cp.plan import join as join_spans
from ctxpar.kernels.levels import bucket_range
from ctxpar.kernels.state import FenwickState
from ctxpar.kernels.torch_chunked import transport


@dataclass
class Summary:
    span: Span
    buckets: torch.Tensor
    trans: torch.Tensor | None

    def bucket(self, bit: int) -> torch.Tensor | None:
        bits = self.span.bits
        return self.buckets[:, :, bits.index(bit)] if bit in bits else None


def join(x: Summary | None, y: Summary | None) -> Summary | None:
    """x followed by y. Every bucket of y's end holds y's own tokens of its range plus the buckets
    of x's end nested in that range (aligned dyadic blocks nest or are disjoint), carried across y."""
    span = join_spans(None if x is None else x.span, None if y is None else y.span)
    if x is None or y is None or y.span.complete:
        return y if y is not None else x
    out = []
    for bit in span.bits:
        lo, hi = bucket_range(span.b, bit)
        nested = [i for i, b in enumerate(x.span.bits) if lo <= bucket_range(x.span.b, b)[0] and bucket_range(x.span.b, b)[1] <= hi]
        own = y.bucket(bit)
        carried = transport(y.trans, sum(x.buckets[:, :, i] for i in nested)) if nested else None
        out.append(own if carried is None else carried if own is None else own + carried)
    trans = None if span.complete else transport(y.trans, x.trans)
    return Summary(span, torch.stack(out, dim=2), trans)


def compact(span: Span, buckets: torch.Tensor, trans: torch.Tensor | None) -> Summary:
    """A summary from full Fenwick buckets ``[R, H, >= bit_length(b), K, V]`` (dead bits dropped).
    Slices, not an index list: a host list indexing a CUDA tensor would copy it over and sync."""
    live = [buckets[:, :, bit] for bit in span.bits]
    kept = torch.stack(live, dim=2) if live else buckets[:, :, :0]
    return Summary(span, kept, None if span.complete else trans)


def to_state(summary: Summary, rows: int) -> FenwickState:
    """A complete summary as the FenwickState of ``rows`` sequences at its end."""
    if not summary.span.complete:
        raise AssertionError(f"only a complete summary is a Fenwick state, got {summary.span}")
    b = summary.span.b
    zero = summary.buckets.new_zeros(summary.buckets.shape[:2] + summary.buckets.shape[3:])
    buckets = [summary.bucket(bit) if (b >> bit) & 1 else zero for bit in range(b.bit_length())]
    return FenwickState(torch.stack(buckets, dim=2), (b,) * rows)


@dataclass(frozen=True)
class Shape:
    """What a summary's size depends on besides its span: rows R, heads H, K, V and k."""

    rows: int
    heads: int
    k_dim: int
    v_dim: int
    trans_dim: int

    def numel(self, span: Span) -> int:
        buckets = len(span.bits) * self.k_dim * self.v_dim
        return self.rows * self.heads * (buckets + (0 if span.complete else self.trans_dim**2))


def pack(summary: Summary) -> torch.Tensor:
    parts = [summary.buckets.reshape(-1)]
    if summary.trans is not None:
        parts.append(summary.trans.reshape(-1))
    return torch.cat(parts)


def unpack(flat: torch.Tensor, span: Span, shape: Shape) -> Summary:
    R, H = shape.rows, shape.heads
    nb = R * H * len(span.bits) * shape.k_dim * shape.v_dim
    buckets = flat[:nb].view(R, H, len(span.bits), shape.k_dim, shape.v_dim)
    trans = None
    if not span.complete:
        trans = flat[nb : nb + R * H * shape.trans_dim**2].view(R, H, shape.trans_dim, shape.trans_dim)
    return Summary(span, buckets, trans)
