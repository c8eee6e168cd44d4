"""CPContext: this rank's place in a context-parallel op, and the op itself.

Forward on rank r:
  1. the local op on every local piece: the piece that crosses in from nothing at its true
     position (``FenwickState.empty``), documents that start here from the caller's state. Its
     final state is this rank's summary (the state of the piece that crosses out from its first
     token, plus the product of its transitions) - the only thing the other ranks need;
  2. exchange the summaries (all-gather or log P); the exchange moves O(P) or O(log P) states,
     never anything that grows with T;
  3. the joined prefix is the Fenwick state at the first token; add what the queries of the piece
     that crosses in read from it (the output is linear in that state, so this equals running from it).
Backward is autograd through all of it, the exchange included: the incoming state's gradient flows
back to the senders' final states. So a sender's local backward waits for its receivers' forward
and read gradients; the exchange itself is tens of microseconds. The receiver's reads are what the
step pays for CP: on 2 H200s at 512K tokens per GPU, rank 1 ran 7.0 ms more kernels than rank 0
(the reads kernels 5.4 ms) in a 118 ms step. Launching the reads' backward on a side stream,
beside the local backward, made the two slower together than one after the other (2026-11-30).
With equal power-of-two slices the state arriving at rank r holds one bucket per set bit of r,
and each further bucket costs about as much again (bench_state_reads.py: 4.1 ms at 512K tokens),
so the slowest of P ranks pays log2 P buckets (perf_model_cp.py). Running the reads inside the
local op's kernels, as initial nodes that its chunks read, cost 15 ms there (tried on 2026-11-30,
reverted).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ctxpar.cp import exchange, local
from ctxpar.cp.plan import ENDED, Layout, Piece, Span, layout
from ctxpar.cp.summary import Shape, Summary, compact, join, to_state
from ctxpar.cp.transport import DistTransport, SimGroup, SimTransport
from ctxpar.kernels import FenwickState, log_linear_gdn, log_linear_mamba2
from ctxpar.kernels.inputs import canonicalize, scaled
from ctxpar.kernels.torch_chunked import DEFAULT_CHUNK


class CPContext:
    """This rank's slice of a sequence (or of a packed batch of documents) split across ``group``.

    ``cu_seqlens``: the GLOBAL packed document offsets (host ints, read once here), or None for
    ``B`` sequences that each span all ranks. ``slice_lengths``: tokens per rank (default: equal
    slices); each a multiple of the chunk (64). ``scheme``: ``"allgather"`` (one collective, P
    summaries received) or ``"logp"`` (ceil(log2 P) pairwise rounds, one summary each).

    ``initial_state`` given to the op is the GLOBAL one (one sequence per document, or per batch
    row with equal positions), passed identically on every rank: the rank holding a document's first
    token consumes it, so its gradient lands there. The final state returned holds one sequence
    per local piece, at the end of this rank's slice.
    """

    def __init__(self, group=None, cu_seqlens=None, scheme="allgather", *, slice_lengths=None,
                 chunk_size=DEFAULT_CHUNK):
        self._setup(DistTransport(group if group is not None else dist.group.WORLD), cu_seqlens, scheme,
                    slice_lengths, chunk_size)

    @classmethod
    def simulated(cls, sim: SimGroup, rank: int, cu_seqlens=None, scheme="allgather", **kwargs) -> "CPContext":
        """Rank ``rank`` of the simulated group ``sim`` (see ``ctxpar.cp.simulate``)."""
        return cls.from_transport(SimTransport(sim, rank), cu_seqlens, scheme, **kwargs)

    @classmethod
    def from_transport(cls, transport, cu_seqlens=None, scheme="allgather", *, slice_lengths=None,
                       chunk_size=DEFAULT_CHUNK) -> "CPContext":
        """Over any object with ``rank``, ``size``, ``start_all_gather(x)`` (a handle whose ``wait()``
        gives ``[size, *x.shape]``), ``exchange(send, recv_shapes)`` and ``bytes_sent()``, with the
        semantics of ``ctxpar.comm.collectives`` (see ``ctxpar.cp.transport``)."""
        self = cls.__new__(cls)
        self._setup(transport, cu_seqlens, scheme, slice_lengths, chunk_size)
        return self

    def _setup(self, transport, cu_seqlens, scheme, slice_lengths, chunk_size):
        if scheme not in exchange.SCHEMES:
            raise ValueError(f"scheme must be one of {exchange.SCHEMES}, got {scheme!r}")
        self.transport, self.scheme, self.chunk_size = transport, scheme, chunk_size
        self.rank, self.world_size = transport.rank, transport.size
        self.cu_seqlens = None if cu_seqlens is None else [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
        if self.cu_seqlens is not None and slice_lengths is None:
            total = self.cu_seqlens[-1]
            if total % self.world_size:
                raise ValueError(f"{total} packed tokens do not split into {self.world_size} equal slices")
            slice_lengths = [total // self.world_size] * self.world_size
        self.slice_lengths = None if slice_lengths is None else [int(n) for n in slice_lengths]
        if self.slice_lengths is not None:
            self._check_slices(self.slice_lengths)
        self._layouts = {}

    def _check_slices(self, lengths):
        if len(lengths) != self.world_size:
            raise ValueError(f"slice_lengths has {len(lengths)} entries for {self.world_size} ranks")
        bad = [n for n in lengths if n <= 0 or n % self.chunk_size]
        if bad:
            raise ValueError(f"every slice length must be a positive multiple of the chunk ({self.chunk_size}), got {lengths}")
        if self.cu_seqlens is not None and sum(lengths) != self.cu_seqlens[-1]:
            raise ValueError(f"slices hold {sum(lengths)} tokens but cu_seqlens packs {self.cu_seqlens[-1]}")

    @property
    def group(self):
        """The torch.distributed group (None in simulated mode or over a custom transport)."""
        return getattr(self.transport, "group", None)

    @property
    def offset(self) -> int | None:
        """This rank's first global token (None until the slice length is known)."""
        return None if self.slice_lengths is None else sum(self.slice_lengths[: self.rank])

    def bytes_sent(self) -> int:
        return self.transport.bytes_sent()

    def layout(self, local_length: int, starts: tuple[int, ...] | None = None) -> Layout:
        """The host structure for a slice of ``local_length`` tokens (cached); ``starts``: each
        document's initial-state length."""
        lengths = self.slice_lengths
        if lengths is None:  # equal slices of whatever length the call brings
            lengths = [local_length] * self.world_size
            self._check_slices(lengths)
        if lengths[self.rank] != local_length:
            raise ValueError(f"rank {self.rank} holds {local_length} tokens, its slice is {lengths[self.rank]}")
        total = sum(lengths)
        docs = [(0, total)] if self.cu_seqlens is None else list(zip(self.cu_seqlens, self.cu_seqlens[1:]))
        starts = starts or (0,) * len(docs)
        key = (local_length, starts)
        if key not in self._layouts:
            offsets = [sum(lengths[:r]) for r in range(self.world_size + 1)]
            self._layouts[key] = layout(self.rank, offsets, docs, list(starts))
        return self._layouts[key]

    # --- the op -----------------------------------------------------------------------------

    def attention(self, q, k, v, g, beta, level_scales, *, scale, initial_state, output_final_state, cu_seqlens,
                  backend, default_scale):
        B, T, H, V = v.shape
        self._check_call(B, cu_seqlens)
        lay = self.layout(T, self._starts(initial_state, B))
        local_cu = None if self.cu_seqlens is None else lay.local_cu_seqlens
        c = canonicalize(q, k, v, g, beta, level_scales, scale, None, local_cu, default_scale=default_scale,
                         native=True)
        piece = lay.crosses_in
        lam, scales = level_scales, None
        if piece is not None:  # the scales at which the crossing-in queries read the incoming state
            lam, scales = local.pick_scales(level_scales, piece.end, piece.position)
        op = log_linear_mamba2 if beta is None else log_linear_gdn
        args = (q, k, v, g, lam) if beta is None else (q, k, v, g, beta, lam)
        o, final = op(*args, scale=scale, initial_state=self._local_states(c, lay, initial_state),
                      output_final_state=output_final_state or lay.crosses_out is not None,
                      cu_seqlens=local_cu, backend=backend)
        carry = None if piece is None else local.carry(*_inputs(c, piece), piece.position, self.chunk_size)

        shape = Shape(B, H, c.k.shape[-1], V, 1 if beta is None else c.k.shape[-1])
        comm = exchange.make(self.scheme, self.transport, lay, shape)
        state = None if initial_state is None else initial_state.buckets
        comm.start(self._own_summary(c, lay, final, carry), exchange.anchor([q, k, v, g, beta, level_scales], [state]))
        incoming, tie = comm.finish()
        if piece is not None:
            o = self._add_reads(o, c, piece, carry, scales, incoming)
            if output_final_state:
                final = self._carry_final(final, piece, carry, incoming, B)
        return exchange.tied(o, tie), (final if output_final_state else None)

    def _piece_rows(self, batch: int) -> int:
        """Sequences one piece holds: every batch row, or one packed document."""
        return batch if self.cu_seqlens is None else 1

    def _check_call(self, batch, cu_seqlens):
        if cu_seqlens is None:
            return
        if self.cu_seqlens is None:
            raise ValueError("with cp, build the CPContext from the global cu_seqlens (CPContext(group, cu_seqlens))")
        host = not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.device.type == "cpu"
        if host and [int(x) for x in torch.as_tensor(cu_seqlens).tolist()] != self.cu_seqlens:
            raise ValueError("cu_seqlens differs from the global cu_seqlens the CPContext was built from")

    def _starts(self, state: FenwickState | None, batch: int) -> tuple[int, ...] | None:
        if state is None:
            return None
        if self.cu_seqlens is None:
            if len(set(state.positions)) != 1 or state.num_sequences != batch:
                raise ValueError(f"with cp and no cu_seqlens, initial_state needs {batch} sequences at one position, "
                                 f"got positions {state.positions}")
            return state.positions[:1]
        if state.num_sequences != len(self.cu_seqlens) - 1:
            raise ValueError(f"initial_state holds {state.num_sequences} sequences; with cp it is the global state "
                             f"of all {len(self.cu_seqlens) - 1} documents")
        return state.positions

    def _own_summary(self, c, lay: Layout, final: FenwickState | None, carry: local.Carry | None) -> Summary:
        """The local op's final state of the piece that crosses out (the last local sequences):
        from a zero state at its first token when it crosses in too, else its document's whole state."""
        rows = self._piece_rows(c.v.shape[0])
        if lay.crosses_out is None:
            K, V = c.k.shape[-1], c.v.shape[-1]
            return Summary(ENDED, c.v.new_zeros(rows, c.v.shape[2], 0, K, V, dtype=_state_dtype(c)), None)
        buckets = final.buckets[-rows:].to(_state_dtype(c))  # one wire dtype on every rank, whatever the backend
        return compact(lay.summaries[lay.rank], buckets, None if carry is None else carry.trans)

    def _local_states(self, c, lay: Layout, initial_state) -> FenwickState | None:
        """The local op's initial states: nothing at the true position for the piece that crosses
        in (its incoming state is added after the exchange), the caller's for documents starting here."""
        if initial_state is None and lay.crosses_in is None:
            return None
        rows = c.v.shape[0]
        states = []
        for piece in lay.pieces:
            if piece.crosses_in or initial_state is None:
                states.append(FenwickState.empty(rows, c.v.shape[2], c.k.shape[-1], c.v.shape[-1],
                                                 (piece.position,) * rows, dtype=_state_dtype(c), device=c.v.device))
            else:
                states.append(_user_state(initial_state, piece, self.cu_seqlens))
        return FenwickState.stack(states)

    def _add_reads(self, o, c, piece: Piece, carry: local.Carry, scales, incoming: Summary) -> torch.Tensor:
        """o plus what the crossing-in piece (local rows [0, end)) reads from the incoming state."""
        state = to_state(incoming, c.v.shape[0])
        if piece.end == o.shape[1]:
            return local.add_state_reads(o, carry, scales, piece.position, state.buckets)
        return torch.cat([local.add_state_reads(o[:, : piece.end], carry, scales, piece.position, state.buckets),
                          o[:, piece.end :]], dim=1)

    def _carry_final(self, final: FenwickState, piece: Piece, carry: local.Carry, incoming: Summary,
                     rows: int) -> FenwickState:
        """The crossing-in piece's final state came from a zero start: join the incoming state in."""
        n = self._piece_rows(rows)
        end = piece.position + piece.end - piece.start
        own = compact(Span(piece.position, end), final.buckets[:n], carry.trans)
        carried = to_state(join(incoming, own), n)
        rest = FenwickState(final.buckets[n:], final.positions[n:])
        return FenwickState.stack([carried, rest]) if rest.num_sequences else carried


def _state_dtype(c) -> torch.dtype:
    """Fenwick states and summaries are float32 (float64 for float64 inputs), whatever q, k, v are."""
    return torch.promote_types(c.v.dtype, torch.float32)


def _inputs(c, piece: Piece):
    """Canonical q, k, v, g, beta of one piece, [R, n, ...]."""
    cut = lambda x: None if x is None else x[:, piece.start : piece.end]  # noqa: E731
    return scaled(cut(c.q), c.scale), cut(c.k), cut(c.v), cut(c.g), cut(c.beta)


def _user_state(state: FenwickState, piece: Piece, cu_seqlens) -> FenwickState:
    return state if cu_seqlens is None else state.select(piece.doc)
