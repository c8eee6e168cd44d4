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


@dataclass(frozen=True)
class Round:
    """One round of the log P exchange; every tuple is indexed by rank q, whose partner is q ^ step."""

    step: int
    sent: tuple[Span, ...]  # q's block total: what it sends when its partner needs it
    useful: tuple[bool, ...]  # q's partner needs q's total (else a one-element placeholder goes)
    total: tuple[bool, ...]  # q must update its total this round (a later round needs it)
    prefix: tuple[bool, ...]  # q must update its prefix this round


def hypercube_rounds(summaries: tuple[Span, ...]) -> list[Round]:
    """The log P exchange as a host dry run, then a liveness pass over it.

    Each round every rank swaps its block total (the join of its aligned block of ``step`` ranks)
    with its partner's; the lower block's total joins the upper ranks' exclusive prefix. After
    ceil(log2 P) rounds each rank's prefix is the join of every rank before it; ranks missing at
    the top (P not a power of two) only shorten blocks. A join with a complete right side ignores
    its left side, so, going backward from the prefixes that are wanted (ranks whose first document
    began earlier), most messages of short packed documents are never needed: they are not sent,
    and a round that neither partner needs is skipped.
    """
    P = len(summaries)
    total, prefix, history, step = list(summaries), [None] * P, [], 1
    while step < P:
        history.append((step, tuple(total), tuple(prefix)))
        for q in range(P):
            p = q ^ step
            if p < P and p < q:
                prefix[q], total[q] = join(history[-1][1][p], prefix[q]), join(history[-1][1][p], total[q])
            elif p < P:
                total[q] = join(total[q], history[-1][1][p])
        step <<= 1

    need_total = [False] * P
    need_prefix = [q > 0 and summaries[q - 1] != ENDED for q in range(P)]
    rounds = []
    for step, totals, prefixes in reversed(history):
        useful, before_total = [False] * P, list(need_total)
        for q in range(P):
            p = q ^ step
            if p < P and p < q:
                useful[p] = (need_prefix[q] and _open(prefixes[q])) or (need_total[q] and _open(totals[q]))
            elif p < P:
                useful[p] = need_total[q]
                before_total[q] = need_total[q] and _open(totals[p])
        before_total = [t or u for t, u in zip(before_total, useful)]
        rounds.append(Round(step, totals, tuple(useful), tuple(need_total), tuple(need_prefix)))
        need_total = before_total
    return rounds[::-1]


def _open(span: Span | None) -> bool:
    """Whether a join with ``span`` on its right needs the left side."""
    return span is None or not span.complete
