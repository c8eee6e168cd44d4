"""Autograd-aware collectives and point-to-point exchanges on any process group.

Every function takes a ``group`` (None means the world) and works on gloo and NCCL, on the world
and on subgroups; ranks in arguments and results are ranks *within that group*.

Gradient convention: the objective is the SUM over the group's ranks of each rank's local loss.
Hence ``all_gather``'s backward is a reduce-scatter (rank r's input gets the sum of every rank's
gradient for slot r), ``all_reduce_sum``'s backward is an all-reduce-sum, and a point-to-point
send gets back the gradient its receiver computed. A loss that every rank computes identically
from replicated data is counted once per rank: its gradient comes out multiplied by the group size
(divide the loss by the group size, or compute it on one rank only).

Backward is communication too, which brings two rules:
  * every rank of the group must run backward through every call, in the same order, so each
    rank must use what a call returns in its loss (unused results leave peers waiting);
  * whether a call records a backward depends only on grad mode, never on whether this rank's
    inputs require grad (a dummy input requiring grad forces it), so ranks always agree on it.

Every call adds the bytes this rank puts on the wire to a per-group counter (``comm_stats``), for
forward and backward alike. Point-to-point volume is exact; collectives are counted at the volume
of a bandwidth-optimal ring (what NCCL sends): all_gather and reduce-scatter (P-1)/P of the full
buffer, all-reduce twice that.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# torch 2.13 renamed the flat-buffer collectives (the old names warn); older releases lack the new.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

RecvSpec = tuple[Sequence[int], torch.dtype]


# Bytes this rank sent per group since the last reset_comm_stats().
_bytes_sent: defaultdict[ProcessGroup, int] = defaultdict(int)


def comm_stats(group: ProcessGroup | None = None) -> int:
    """Bytes this rank sent on ``group`` (forward and backward) since the last reset."""
    return _bytes_sent[_resolve(group)]


def reset_comm_stats() -> None:
    _bytes_sent.clear()


def _count(group: ProcessGroup, nbytes: int) -> None:
    _bytes_sent[group] += nbytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _resolve(group: ProcessGroup | None) -> ProcessGroup:
    """The group object (None means the world); refuses groups this rank is not a member of."""
    if group is None:
        return dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"rank {dist.get_rank()} is not a member of this process group")
    return group


def _anchor() -> torch.Tensor:
    # An input that requires grad, so autograd records the call under grad mode even when no
    # local input requires grad (see the module docstring).
    return torch.empty(0, requires_grad=True)


def _differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


# --- all_gather -----------------------------------------------------------------------------


class PendingAllGather:
    """An all_gather in flight (from ``start_all_gather``); ``wait()`` gives its result."""

    def __init__(self, x: torch.Tensor, group: ProcessGroup | None):
        self.group = _resolve(group)
        self.size = dist.get_world_size(self.group)
        self._x = x
        # The flat contiguous copy must stay alive until the collective completes.
        self._send = x.detach().contiguous().view(-1)
        self._out = x.new_empty((self.size, *x.shape))
        self._work = _all_gather_single(
            self._out.view(-1), self._send, group=self.group, async_op=True
        )
        _count(self.group, (self.size - 1) * _nbytes(self._send))
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        """The gathered ``[group size, *x.shape]`` tensor, tracked by autograd (grad mode at the
        time of the first ``wait`` decides). Later calls return the same tensor."""
        if self._result is None:
            self._work.wait()
            self._result = _AllGather.apply(_anchor(), self._x, self)
            self._send = None
        return self._result


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, x, pending: PendingAllGather):
        # The data already arrived; forward only attaches the backward to it.
        ctx.group = pending.group
        return pending._out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return None, _reduce_scatter(grad, ctx.group), None


def _reduce_scatter(stacked: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[P, *s] on every rank -> [*s]: the sum over ranks of their slot for this rank."""
    out = stacked.new_empty(stacked.shape[1:])
    _reduce_scatter_single(out.view(-1), stacked.contiguous().view(-1), group=group)
    _count(group, (stacked.shape[0] - 1) * _nbytes(out))
    return out


def start_all_gather(x: torch.Tensor, group: ProcessGroup | None = None) -> PendingAllGather:
    """Start gathering every rank's ``x`` (same shape and dtype everywhere); computation can run
    until ``.wait()``. Backward is synchronous."""
    return PendingAllGather(x, group)


def all_gather(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``x`` (same shape and dtype everywhere) stacked along a new dim 0 (index =
    group rank). Backward: rank r's
    ``x`` gets the sum over ranks of their gradient for slot r (a reduce-scatter)."""
    return start_all_gather(x, group).wait()


# --- all_reduce -----------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, x, group):
        ctx.group = group
        return _all_reduce_sum(x, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return None, _all_reduce_sum(grad, ctx.group), None


def _all_reduce_sum(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    out = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    size = dist.get_world_size(group)
    _count(group, 2 * (size - 1) * _nbytes(out) // size)
    return out


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """The sum of every rank's ``x``. Backward: the sum of every rank's output gradient (so a loss
    replicated on all ranks is counted once per rank; see the module docstring)."""
    return _AllReduceSum.apply(_anchor(), x, _resolve(group))


# --- point to point -------------------------------------------------------------------------


def _p2p(
    send: Mapping[int, torch.Tensor],
    recv: Mapping[int, RecvSpec],
    group: ProcessGroup,
    device: torch.device,
) -> dict[int, torch.Tensor]:
    """One batch of sends and receives (group ranks), waited for; no autograd."""
    got = {p: torch.empty(tuple(s), dtype=dtype, device=device) for p, (s, dtype) in recv.items()}
    sends = {p: t.detach().contiguous() for p, t in send.items()}

    def op(kind, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        # P2POp takes global ranks on every torch version (group_peer only exists on recent ones).
        return dist.P2POp(kind, tensor, dist.get_global_rank(group, peer), group)

    ops = [op(dist.isend, t, p) for p, t in sends.items()]
    ops += [op(dist.irecv, t, p) for p, t in got.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    _count(group, sum(_nbytes(t) for t in sends.values()))
    return got


class _Exchange(torch.autograd.Function):
    """Sends ``tensors`` to ``dsts`` and returns one output per ``recv`` slot, in order. A slot
    whose peer is None has no sender: it comes out as zeros, still as an output of this call, so
    autograd reaches the call on a rank that receives nothing (see ``send_recv``)."""

    @staticmethod
    def forward(ctx, anchor, group, device, dsts, recv, *tensors):
        ctx.group, ctx.device, ctx.dsts, ctx.recv = group, device, dsts, recv
        ctx.sent = [(t.shape, t.dtype) for t in tensors]
        arriving = {p: spec for p, spec in recv if p is not None}
        got = _p2p(dict(zip(dsts, tensors)), arriving, group, device)
        return tuple(
            got[p] if p is not None else torch.zeros(tuple(shape), dtype=dtype, device=device)
            for p, (shape, dtype) in recv
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        # The reverse exchange: gradients of what arrived go back to its senders, gradients of
        # what was sent come back from its receivers. Non-differentiable dtypes travel only forward.
        back = {
            p: g
            for (p, (_, dtype)), g in zip(ctx.recv, grads)
            if p is not None and _differentiable(dtype)
        }
        expect = {p: spec for p, spec in zip(ctx.dsts, ctx.sent) if _differentiable(spec[1])}
        got = _p2p(back, expect, ctx.group, ctx.device)
        return (None, None, None, None, None, *(got.get(p) for p in ctx.dsts))


def _run_exchange(
    send: Mapping[int, torch.Tensor],
    recv: list[tuple[int | None, RecvSpec]],
    group: ProcessGroup,
    device: torch.device,
    anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    peers = [*send, *(p for p, _ in recv if p is not None)]
    bad = [p for p in peers if not 0 <= p < size or p == rank]
    if bad:
        raise ValueError(f"peers {bad} are not other ranks of this group (rank {rank} of {size})")
    dsts = sorted(send)
    return _Exchange.apply(_anchor() if anchor is None else anchor, group, device, dsts, recv, *(send[p] for p in dsts))


def exchange(
    send: Mapping[int, torch.Tensor],
    recv_shapes: Mapping[int, RecvSpec],
    group: ProcessGroup | None = None,
    *,
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """Send ``send[p]`` to group rank p and receive a ``(shape, dtype)`` tensor from each peer of
    ``recv_shapes``, all in one batch; the peers must post the matching calls. Backward sends the
    gradients back the reverse way and adds them to the sent tensors' gradients.

    A rank that only sends would get nothing through which autograd could reach this call, so the
    gradients its receivers send back would never be collected; under grad mode that is refused
    (use ``send_recv`` or ``shift``, which return zeros where nothing arrives).
    ``device`` is where received tensors live: by default that of the sent tensors, else CUDA's
    current device on an NCCL group, else the CPU.
    """
    group = _resolve(group)
    sends_grad = any(_differentiable(t.dtype) for t in send.values())
    receives_grad = any(_differentiable(dtype) for _, dtype in recv_shapes.values())
    if torch.is_grad_enabled() and sends_grad and not receives_grad:
        raise ValueError(
            "exchange: under grad mode a rank that sends floating-point data must also receive "
            "some, or the gradients sent back to it would never be collected; use send_recv(), "
            "shift() or torch.no_grad()"
        )
    device = device or _default_device(send, group)
    srcs = sorted(recv_shapes)
    outs = _run_exchange(send, [(p, recv_shapes[p]) for p in srcs], group, device)
    return dict(zip(srcs, outs))


def send_recv(
    x: torch.Tensor, dst: int | None, src: int | None, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Send ``x`` to group rank ``dst`` and return what group rank ``src`` sends here (a tensor
    of ``x``'s shape and dtype); None skips that side, and without a ``src`` the result is zeros.
    Backward: the result's gradient goes back to ``src``, and the gradient ``dst`` computed for
    what it received is added to ``x``'s gradient.

    Unlike ``exchange``, a rank that only sends still gets a result (zeros) out of this call:
    using it in the loss is what lets autograd reach the call and collect that gradient. And ``x``
    is the call's anchor (gradient None) even where it is not sent: ``torch.autograd.grad(loss,
    params)`` runs only the calls with a path to ``params``, and a rank that only receives (the
    last one of a halo exchange) would otherwise skip the call its sender waits in.
    """
    send = {} if dst is None else {dst: x}
    anchor = x if x.requires_grad else None
    (out,) = _run_exchange(send, [(src, (x.shape, x.dtype))], _resolve(group), x.device, anchor)
    return out


def shift(x: torch.Tensor, offset: int, group: ProcessGroup | None = None) -> torch.Tensor:
    """Every rank r sends ``x`` to rank r + offset and returns the ``x`` of rank r - offset, or
    zeros where that rank does not exist (``x`` has the same shape and dtype on every rank).
    Backward shifts the gradients by -offset. With offset 1 this is a pipeline step (halos, prefix
    scans); with offset 2**k one round of a Hillis-Steele scan."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def existing(peer: int) -> int | None:
        return peer if 0 <= peer < size else None

    return send_recv(x, existing(rank + offset), existing(rank - offset), group)


def _default_device(send: Mapping[int, torch.Tensor], group: ProcessGroup) -> torch.device:
    if send:
        return next(iter(send.values())).device
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
