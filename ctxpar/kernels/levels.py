"""Fenwick levels: which lambda scale weighs the pair (query t, source s).

Positions count from the start of each document. ``level(t, t) = 0`` and, for ``s < t``,
``level(t, s) = bit_length(t XOR s)``. For a query at ``t`` the sources of level ``j >= 1``
form one aligned block of ``2**(j-1)`` tokens, present iff bit ``j-1`` of ``t`` is set: the
Fenwick bucket of that bit.
"""

from __future__ import annotations

import torch


def num_levels(length: int) -> int:
    """Levels used by a document of ``length`` tokens: ``1 + ceil(log2 length)`` (1 when length <= 1)."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return 1 + (length - 1).bit_length() if length > 1 else 1


def level_of(t, s):
    """Level of the pair (t, s), s <= t; works on ints and on integer tensors (broadcasting)."""
    if isinstance(t, torch.Tensor) or isinstance(s, torch.Tensor):
        x = torch.as_tensor(t) ^ torch.as_tensor(s)
        # frexp writes x = m * 2**e with m in [0.5, 1), so e is the bit length; exact for x < 2**53.
        return torch.frexp(x.double()).exponent.to(x.dtype)
    if s > t:
        raise ValueError(f"level_of needs s <= t, got t={t}, s={s}")
    return (t ^ s).bit_length()


def level_matrix(positions: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` levels of every (query, source) pair of ``positions``; upper triangle is unused."""
    return level_of(positions[:, None], positions[None, :])


def live_bits(position: int) -> list[int]:
    """Bits of ``position`` that hold a Fenwick bucket in the state after ``position`` tokens."""
    return [b for b in range(position.bit_length()) if (position >> b) & 1]


def read_levels(position: int, n: int, bit: int) -> list[tuple[int, int, int]]:
    """How the queries at ``position + i``, ``0 <= i < n``, weigh the bucket of ``bit`` of the state
    after ``position`` tokens: ``[(start, end, level)]``, each query i in one run ``start <= i < end``.

    A query at t reads every source of that bucket at level ``max(bit + 1, bit_length(t XOR position))``;
    the second term grows with t (t stays within ``2**l`` aligned tokens of ``position`` up to the
    end of that block), so the levels form at most one run per level and the runs come in order.
    """
    if not (position >> bit) & 1:
        raise ValueError(f"bit {bit} of position {position} is not set: no such bucket")
    runs, start, level = [], 0, bit + 1
    while start < n:
        end = min(n, (((position >> level) + 1) << level) - position)  # queries still within level's block
        if end > start:
            runs.append((start, end, level))
        start, level = max(start, end), level + 1
    return runs


def bucket_range(position: int, bit: int) -> tuple[int, int]:
    """Token range ``[lo, hi)`` of the bucket of ``bit`` in the state after ``position`` tokens."""
    if not (position >> bit) & 1:
        raise ValueError(f"bit {bit} of position {position} is not set: no such bucket")
    lo = (position >> (bit + 1)) << (bit + 1)
    return lo, lo + (1 << bit)
