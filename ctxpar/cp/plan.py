"""Host-side structure of context parallelism: who holds which tokens of which document, what each
rank's summary covers, and the message pattern of the log P exchange. Pure Python on host ints,
so the op never synchronises with the device to learn its own structure.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctxpar.kernels.levels import bucket_range, live_bits


@dataclass(frozen=True)
class Span:
    """Tokens ``[a, b)`` of one document, in positions counted from the document start (an initial
    state's length included). A summary of a span holds the buckets of the Fenwick state after b
    tokens that meet ``[a, b)``, all from those tokens only, plus the product of their transitions
    when ``a > 0``. ``a == 0`` means the summary is the document's whole state: it needs nothing
    from the left, and whatever lies to its left is discarded when joined."""

    a: int
    b: int

    @property
    def complete(self) -> bool:
        return self.a == 0

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(j for j in live_bits(self.b) if bucket_range(self.b, j)[1] > self.a)


# A rank whose last document ends exactly at its slice end passes nothing on: a complete, empty span.
ENDED = Span(0, 0)


def join(x: Span | None, y: Span | None) -> Span | None:
    """The span of x followed by y (None is the empty identity)."""
    if x is None:
        return y
    if y is None:
        return x
    if y.complete:
        return y
    if x.b != y.a:
        raise AssertionError(f"summaries {x} and {y} are not adjacent pieces of one document")
    return Span(x.a, y.b)


@dataclass(frozen=True)
class Piece:
    """One document's tokens on this rank: local rows ``[start, end)``; ``position`` counts the
    document's tokens before ``start`` (its initial state's length included)."""

    doc: int
    start: int
    end: int
    position: int
    crosses_in: bool  # the document began on an earlier rank


@dataclass(frozen=True)
class Layout:
    rank: int
    pieces: tuple[Piece, ...]
    summaries: tuple[Span, ...]  # every rank's summary, indexed by rank
    crosses_out: Piece | None  # the piece whose document continues on the next rank

    @property
    def crosses_in(self) -> Piece | None:
        return self.pieces[0] if self.pieces[0].crosses_in else None

    @property
    def local_cu_seqlens(self) -> list[int]:
        return [0] + [p.end for p in self.pieces]

    @property
    def incoming_position(self) -> int:
        """Length of the state this rank must receive (0 when its first token starts a document)."""
        piece = self.crosses_in
        return piece.position if piece is not None else 0


def layout(rank: int, offsets: list[int], docs: list[tuple[int, int]], starts: list[int]) -> Layout:
    """``offsets``: [P + 1] global token offsets of the slices; ``docs``: global [start, end) of each
    document; ``starts``: each document's initial-state length (0 without one)."""
    lo, hi = offsets[rank], offsets[rank + 1]
    pieces = tuple(
        Piece(d, max(s, lo) - lo, min(e, hi) - lo, max(s, lo) - s + starts[d], s < lo)
        for d, (s, e) in enumerate(docs)
        if s < hi and e > lo
    )
    last = pieces[-1]
    crosses_out = last if docs[last.doc][1] > hi else None
    summaries = tuple(_summary(offsets[q], offsets[q + 1], docs, starts) for q in range(len(offsets) - 1))
    return Layout(rank, pieces, summaries, crosses_out)


def _summary(lo: int, hi: int, docs, starts) -> Span:
    """What the slice [lo, hi) passes on: the state of the document that runs past hi."""
    for d, (s, e) in enumerate(docs):
        if s < hi < e:
            return Span(lo - s + starts[d] if s < lo else 0, hi - s + starts[d])
    return ENDED


def hypercube_rounds(summaries: tuple[Span, ...]) -> list[list[Span | None]]:
    """The log P exchange as a host dry run: ``rounds[k][q]`` is what rank q sends to its partner
    ``q ^ 2**k`` in round k (the summary of q's aligned block of 2**k ranks).

    Each round every rank swaps its block total with its partner's; the lower block's total joins
    the upper ranks' exclusive prefix. After ceil(log2 P) rounds each rank's prefix is the join of
    every rank before it; ranks missing at the top (P not a power of two) only shorten blocks.
    """
    P = len(summaries)
    total = list(summaries)
    rounds, k = [], 1
    while k < P:
        sent = list(total)
        for q in range(P):
            p = q ^ k
            if p < P:
                total[q] = join(sent[p], total[q]) if p < q else join(total[q], sent[p])
        rounds.append(sent)
        k <<= 1
    return rounds
