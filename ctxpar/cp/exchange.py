"""The two summary exchanges. Both give each rank the exclusive prefix join of the ranks before it
(the Fenwick state at its first token of the document that crosses in). The all-gather runs
asynchronously between ``start`` and ``finish``; the log P rounds depend on each other and run in
``start``, on the caller's thread and stream, so that autograd orders their backward after the
ops that follow (a helper thread's nodes carry another thread's sequence numbers, and a rank could
then run its whole local backward before the exchange its peers are waiting in).

Autograd through the collectives obliges every rank to run backward through every call, in the
same order (see ``ctxpar.comm.collectives``). Hence the ``tie``: zero times what arrived, added to
the op's output, so a rank that needs nothing it received still reaches the call in backward; in
the log P scheme each round's message is also tied to the previous round's arrival, so backward
visits the rounds in reverse order on every rank. And every message carries ``anchor`` (zero that
depends on each op input needing grad): ``torch.autograd.grad(loss, inputs)`` skips any call whose
message leads to none of the requested inputs, which would leave the peers waiting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctxpar.cp.plan import Layout, hypercube_rounds
from ctxpar.cp.summary import Shape, Summary, join, pack, unpack

SCHEMES = ("allgather", "logp")


def _tie(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else 0 * x.sum()


class _Anchor(torch.autograd.Function):
    """A zero scalar with an edge to every input: no gradient for the ``used`` first ones (the
    local op gives theirs), a zero one for the rest. (``0 * x[0, ...]`` per input made a
    full-size zero gradient each, then an add into the real one: with ``o + tie`` about 8 ms of a
    512K-token step on an H200.)"""

    @staticmethod
    def forward(ctx, used, *inputs):
        ctx.used, ctx.shapes = used, [(x.shape, x.dtype, x.device) for x in inputs]
        return torch.zeros((), device=inputs[0].device)

    @staticmethod
    def backward(ctx, grad):
        rest = [torch.zeros(*shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes[ctx.used :]]
        return (None,) * (1 + ctx.used) + tuple(rest)


def anchor(used: list[torch.Tensor | None], others: list[torch.Tensor | None]) -> torch.Tensor:
    """Zero that depends on each input needing grad, for ``start``'s ``anchor``. ``used``: inputs
    the local op consumes on this rank; ``others`` (a global initial state, which only the rank
    holding a document's first token consumes) get a zero gradient from here."""
    needed = [[x for x in group if x is not None and x.requires_grad] for group in (used, others)]
    if not needed[0] and not needed[1]:
        return torch.zeros(())
    return _Anchor.apply(len(needed[0]), *needed[0], *needed[1])


class _Tied(torch.autograd.Function):
    """o itself, with the tie as a second input whose gradient is zero: backward reaches the
    exchange without a pass over o (``o + tie``) or a sum over its gradient."""

    @staticmethod
    def forward(ctx, o, tie):
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros((), device=grad.device)


def tied(o: torch.Tensor, tie: torch.Tensor | None) -> torch.Tensor:
    """The op's output tied to the exchange (see the module docstring)."""
    return o if tie is None else _Tied.apply(o, tie)


def _padded(flat: torch.Tensor, numel: int) -> torch.Tensor:
    # Zero-length messages are awkward for some backends; one zero element costs nothing.
    return F.pad(flat, (0, max(numel, 1) - flat.numel()))


class AllGather:
    """One collective: every rank's summary (padded to the largest) to every rank; the receiver
    folds the summaries from the start of its document."""

    def __init__(self, transport, layout: Layout, shape: Shape):
        self.transport, self.layout, self.shape = transport, layout, shape
        self.numel = max(shape.numel(s) for s in layout.summaries)

    def start(self, own: Summary, anchor: torch.Tensor) -> None:
        self._pending = self.transport.start_all_gather(_padded(pack(own), self.numel) + anchor)

    def finish(self) -> tuple[Summary | None, torch.Tensor]:
        gathered = self._pending.wait()
        rank, spans = self.layout.rank, self.layout.summaries
        if self.layout.crosses_in is None:
            return None, _tie(gathered)
        first = max(q for q in range(rank) if spans[q].complete)
        prefix = None
        for q in range(first, rank):
            prefix = join(prefix, unpack(gathered[q], spans[q], self.shape))
        return prefix, _tie(gathered)


class Hypercube:
    """ceil(log2 P) rounds of pairwise swaps with partner rank ^ 2**k (see ``plan.hypercube_rounds``).
    Every message is one aligned block's summary, so a rank sends at most ceil(log2 P) summaries."""

    def __init__(self, transport, layout: Layout, shape: Shape):
        self.transport, self.layout, self.shape = transport, layout, shape
        self.rounds = hypercube_rounds(layout.summaries)

    def start(self, own: Summary, anchor: torch.Tensor) -> None:
        self._result = self._run(own, anchor)

    def finish(self) -> tuple[Summary | None, torch.Tensor | None]:
        return self._result

    def _run(self, own: Summary, anchor: torch.Tensor):
        rank, size = self.transport.rank, self.transport.size
        total, prefix, last = own, None, None
        for step in self.rounds:
            p = rank ^ step.step
            if p >= size or not (step.useful[rank] or step.useful[p]):
                continue
            mine, theirs = (self.shape.numel(step.sent[q]) if step.useful[q] else 0 for q in (rank, p))
            message = _padded(pack(total) if step.useful[rank] else own.buckets.new_zeros(0), mine) + anchor
            if last is not None:
                message = message + _tie(last)
            last = self.transport.exchange({p: message}, {p: ((max(theirs, 1),), message.dtype)})[p]
            # An unneeded arrival is a placeholder: None joins as the identity, which is exact
            # wherever the liveness pass marked it unneeded.
            other = unpack(last, step.sent[p], self.shape) if step.useful[p] else None
            if p < rank and step.prefix[rank]:
                prefix = join(other, prefix)
            if step.total[rank]:
                total = join(other, total) if p < rank else join(total, other)
        return (prefix if self.layout.crosses_in is not None else None), _tie(last)


def make(scheme: str, transport, layout: Layout, shape: Shape):
    if scheme == "allgather":
        return AllGather(transport, layout, shape)
    if scheme == "logp":
        return Hypercube(transport, layout, shape)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
