"""FenwickState: the log-linear state after a prefix, one K x V matrix per set bit of its length."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FenwickState:
    """The Fenwick state of N sequences.

    ``buckets[n, h, b]`` is the K x V state of the bucket of bit ``b`` of ``positions[n]``: the
    ``2**b`` tokens ``[lo, lo + 2**b)`` with ``lo = (p >> (b+1)) << (b+1)``, all transported to the
    last token seen (for Mamba-2 decayed by ``exp(G[p-1] - G[s])``; for Gated DeltaNet multiplied by
    the transitions ``A[p-1] ... A[s+1]``). Buckets of unset bits are ignored by every reader and
    receive zero gradient. Positions are host ints: they decide the level structure, so they are
    never data-dependent.
    """

    buckets: torch.Tensor  # [N, H, nbits, K, V], float32 or float64
    positions: tuple[int, ...]
    holds_nothing: bool = False  # see ``empty``

    def __post_init__(self):
        self.positions = tuple(int(p) for p in self.positions)
        if self.buckets.dim() != 5:
            raise ValueError(f"FenwickState.buckets must be [N, H, nbits, K, V], got shape {tuple(self.buckets.shape)}")
        if len(self.positions) != self.buckets.shape[0]:
            raise ValueError(
                f"FenwickState has {self.buckets.shape[0]} sequences of buckets but {len(self.positions)} positions"
            )
        if any(p < 0 for p in self.positions):
            raise ValueError(f"FenwickState positions must be >= 0, got {self.positions}")
        needed = max((p.bit_length() for p in self.positions), default=0)
        if self.buckets.shape[2] < needed:
            raise ValueError(
                f"FenwickState at position {max(self.positions)} needs {needed} buckets, has {self.buckets.shape[2]}"
            )
        if not self.buckets.is_floating_point():
            raise TypeError(f"FenwickState.buckets must be floating point, got {self.buckets.dtype}")

    @classmethod
    def zeros(cls, n, heads, k_dim, v_dim, positions=None, *, dtype=torch.float32, device=None):
        positions = tuple(positions) if positions is not None else (0,) * n
        nbits = max((p.bit_length() for p in positions), default=0)
        return cls(torch.zeros(n, heads, nbits, k_dim, v_dim, dtype=dtype, device=device), positions)

    @classmethod
    def empty(cls, n, heads, k_dim, v_dim, positions, *, dtype=torch.float32, device=None):
        """Sequences that continue at ``positions`` from nothing: the level structure of those
        positions with all-zero buckets, which a backend may skip reading. Context parallelism
        runs a piece that starts mid-document this way and adds what arrives from the other
        ranks afterwards."""
        return cls(cls.zeros(n, heads, k_dim, v_dim, positions, dtype=dtype, device=device).buckets, positions,
                   holds_nothing=True)

    @property
    def num_sequences(self) -> int:
        return self.buckets.shape[0]

    def live_mask(self) -> torch.Tensor:
        """``[N, nbits]`` bool: which buckets hold tokens."""
        bits = torch.arange(self.buckets.shape[2])
        pos = torch.tensor(self.positions, dtype=torch.int64)
        return ((pos[:, None] >> bits[None, :]) & 1).bool().to(self.buckets.device)

    def with_bits(self, nbits: int) -> "FenwickState":
        """The same state with room for ``nbits`` buckets (zero-padded; never drops a live bucket)."""
        have = self.buckets.shape[2]
        if nbits < max((p.bit_length() for p in self.positions), default=0):
            raise ValueError(f"cannot shrink a FenwickState at positions {self.positions} to {nbits} buckets")
        if nbits <= have:
            return FenwickState(self.buckets[:, :, :nbits], self.positions)
        pad = self.buckets.new_zeros(*self.buckets.shape[:2], nbits - have, *self.buckets.shape[3:])
        return FenwickState(torch.cat([self.buckets, pad], dim=2), self.positions)

    def select(self, index: int) -> "FenwickState":
        return FenwickState(self.buckets[index : index + 1], self.positions[index : index + 1])

    @staticmethod
    def stack(states: list["FenwickState"]) -> "FenwickState":
        if len(states) == 1:
            return states[0]
        nbits = max(s.buckets.shape[2] for s in states)
        states = [s.with_bits(nbits) for s in states]
        return FenwickState(
            torch.cat([s.buckets for s in states]), tuple(p for s in states for p in s.positions)
        )

    def detach(self) -> "FenwickState":
        return FenwickState(self.buckets.detach(), self.positions, self.holds_nothing)

    def to(self, *args, **kwargs) -> "FenwickState":
        return FenwickState(self.buckets.to(*args, **kwargs), self.positions, self.holds_nothing)
