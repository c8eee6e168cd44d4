"""ctxpar.comm on 2, 3 and 4 gloo processes (and, with -m gpu, NCCL on 2 and 4 GPUs), checked
against single-process float64 references.

Starting processes dominates the cost, so each world size is one spawn that runs every check on
several groups: the world, a new group spanning it (dp=1 mesh), a one-rank group, and on 4 ranks
the CP and DP groups of a dp=2 x cp=2 mesh (contiguous and strided subgroups, one without global
rank 0). Inputs are fresh random numbers on every run; the seed is printed for reproduction.
"""

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ctxpar.comm.collectives import (
    all_gather,
    all_reduce_sum,
    comm_stats,
    exchange,
    reset_comm_stats,
    shift,
    start_all_gather,
)
from ctxpar.comm.halo import causal_conv1d_cp, halo_exchange
from ctxpar.comm.mesh import build_mesh
from tests.distributed import run_distributed

F64 = torch.float64
F64_BYTES = 8


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_comm(world_size):
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    run_distributed(check_world, world_size, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_comm_nccl(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    run_distributed(check_world, world_size, seed, backend="nccl")


def check_world(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        torch.set_default_device(torch.device("cuda", torch.cuda.current_device()))
    with pytest.raises(ValueError, match="dp \\* cp"):
        build_mesh(world + 1, 1)
    flat = build_mesh(1, world)
    assert (flat.cp_rank, flat.cp_size, flat.dp_rank, flat.dp_size) == (rank, world, 0, 1)
    groups = {
        "world": (None, list(range(world))),
        "cp of dp=1": (flat.cp_group, list(range(world))),
        "dp of dp=1": (flat.dp_group, [rank]),
    }
    if world == 4:
        mesh = build_mesh(2, 2)
        assert (mesh.cp_rank, mesh.cp_size) == (rank % 2, 2)
        assert (mesh.dp_rank, mesh.dp_size) == (rank // 2, 2)
        groups["cp of 2x2"] = (mesh.cp_group, [rank - rank % 2, rank - rank % 2 + 1])
        groups["dp of 2x2"] = (mesh.dp_group, [rank % 2, rank % 2 + 2])
    for label, (group, members) in groups.items():
        gathered = all_gather(torch.tensor(rank), group)
        assert gathered.tolist() == members, (label, gathered)
        for check in (check_all_gather, check_all_reduce, check_p2p, check_halo_and_conv):
            check(group, seed, label)
    check_errors()


def check_all_gather(group, seed, label):
    """Two gathers in flight at once (one async, overlapped with computation), rank 0's input
    requiring no grad: the backward reduce-scatters must still run and match."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator("cpu").manual_seed(seed)
    xs = _randn(gen, 2, size, 3, 2)  # [gather, rank, ...]
    # Loss weights, [gather, rank whose loss, slot, ...]
    ws = _randn(gen, 2, size, size, 3, 2)
    x = xs[:, rank].clone().requires_grad_(rank != 0)
    reset_comm_stats()
    pending = start_all_gather(x[0], group)
    second = all_gather(x[1], group)  # runs while the first is in flight
    torch.randn(64, 64).matmul(torch.randn(64, 64))  # stands for the computation to overlap
    outs = [pending.wait(), second]
    assert pending.wait() is outs[0]
    sum((out * w[rank]).sum() for out, w in zip(outs, ws)).backward()
    for out, expected in zip(outs, xs):
        _close(out, expected, f"{label}: all_gather")
    if rank == 0:
        assert x.grad is None
    else:
        _close(x.grad, ws[:, :, rank].sum(1), f"{label}: all_gather grad")
    _expect_bytes(group, 4 * (size - 1) * 6 * F64_BYTES, f"{label}: all_gather")


def check_all_reduce(group, seed, label):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator("cpu").manual_seed(seed)
    xs, ws = _randn(gen, 2, size, 5)
    x = xs[rank].clone().requires_grad_()
    reset_comm_stats()
    out = all_reduce_sum(x, group)
    (out * ws[rank]).sum().backward()
    _close(out, xs.sum(0), f"{label}: all_reduce_sum")
    _close(x.grad, ws.sum(0), f"{label}: all_reduce_sum grad")
    ring_bytes = 2 * (size - 1) * 5 * F64_BYTES // size
    _expect_bytes(group, 2 * ring_bytes, f"{label}: all_reduce_sum")


def check_p2p(group, seed, label):
    """An all-to-all exchange, then shifts both ways of a nonlinear function of what arrived,
    against the same program run for all ranks in one process."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator("cpu").manual_seed(seed)
    xs, w, u = _randn(gen, 3, size, 3)
    c = _randn(gen, size, size, 3)  # message s -> r is xs[s] * c[s, r]
    others = [p for p in range(size) if p != rank]

    x = xs[rank].clone().requires_grad_()
    reset_comm_stats()
    got = exchange({p: x * c[rank, p] for p in others}, {p: ((3,), F64) for p in others}, group)
    h = x + sum((got[p] ** 2 for p in others), torch.zeros(3, dtype=F64))
    y, z = shift(h, 1, group), shift(h, -1, group)
    ((w[rank] * h * y).sum() + (u[rank] * z).sum()).backward()

    xr = xs.clone().requires_grad_()
    off_diagonal = 1 - torch.eye(size, dtype=F64)[:, :, None]
    hr = xr + ((xr[:, None] * c) ** 2 * off_diagonal).sum(0)
    zero = torch.zeros(1, 3, dtype=F64)
    yr, zr = torch.cat([zero, hr[:-1]]), torch.cat([hr[1:], zero])
    ((w * hr * yr).sum() + (u * zr).sum()).backward()

    _close(h, hr[rank], f"{label}: exchange")
    _close(y, yr[rank], f"{label}: shift(+1)")
    _close(z, zr[rank], f"{label}: shift(-1)")
    _close(x.grad, xr.grad[rank], f"{label}: p2p grad")
    neighbours = (rank > 0) + (rank < size - 1)
    _expect_bytes(group, 2 * (size - 1 + neighbours) * 3 * F64_BYTES, f"{label}: p2p")


def check_halo_and_conv(group, seed, label):
    """Halo and causal conv on a ragged split (rank 0 holding exactly the halo width), against the
    unsplit convolution; the halo traffic must not depend on the slice lengths."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator("cpu").manual_seed(seed)
    batch, channels = 2, 3
    for kernel in (1, 2, 4):
        width = kernel - 1
        for extra in (0, 40):  # short slices, then long ones; rank 0 holds exactly the halo
            others = torch.randint(width + 1, width + 5, (size - 1,), generator=gen, device="cpu")
            lengths = [max(width, 1), *(others + extra).tolist()]
            start, total = sum(lengths[:rank]), sum(lengths)
            mine = slice(start, start + lengths[rank])
            xs, dy = _randn(gen, 2, batch, total, channels)
            dhalo = _randn(gen, size, batch, width, channels)
            weight = _randn(gen, channels, kernel)
            bias = _randn(gen, channels)

            x, wt, b = (t.clone().requires_grad_() for t in (xs[:, mine], weight, bias))
            reset_comm_stats()
            halo = halo_exchange(x, width, group)
            y = causal_conv1d_cp(x, wt, b, group)
            ((y * dy[:, mine]).sum() + (halo * dhalo[rank]).sum()).backward()

            xr, wr, br = (t.clone().requires_grad_() for t in (xs, weight, bias))
            yr = F.conv1d(xr.transpose(1, 2), wr.unsqueeze(1), br, padding=width, groups=channels)
            yr = yr[..., :total].transpose(1, 2)
            starts = [sum(lengths[:r]) for r in range(size)]
            halos = [torch.zeros(batch, width, channels, dtype=F64)]
            halos += [xr[:, s - width : s] for s in starts[1:]]
            ((yr * dy).sum() + sum((hr * d).sum() for hr, d in zip(halos, dhalo))).backward()

            what = f"{label}: kernel {kernel}, lengths {lengths}"
            _close(halo, halos[rank], f"{what}: halo")
            _close(y, yr[:, mine], f"{what}: conv")
            _close(x.grad, xr.grad[:, mine], f"{what}: grad x")
            for local, expected, name in [(wt.grad, wr.grad, "weight"), (b.grad, br.grad, "bias")]:
                dist.all_reduce(local, group=group)  # each rank holds its share of the gradient
                _close(local, expected, f"{what}: grad {name}")
            neighbours = (rank > 0) + (rank < size - 1)
            halo_bytes = batch * width * channels * F64_BYTES
            _expect_bytes(group, 2 * neighbours * halo_bytes, what)


def check_errors():
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.ones(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="not other ranks"):
        exchange({rank: x}, {rank: ((3,), F64)})
    with pytest.raises(ValueError, match="must also receive"):
        exchange({(rank + 1) % world: x}, {})
    with pytest.raises(ValueError, match="width <= T_local"):
        halo_exchange(torch.zeros(1, 2, 3), 3)
    with pytest.raises(ValueError, match="expected x"):
        causal_conv1d_cp(torch.zeros(1, 4, 3), torch.zeros(2, 2), None)
    # Integers travel forward only, so a rank may send them without receiving, even under grad mode.
    send = {rank + 1: torch.tensor([rank])} if rank + 1 < world else {}
    recv = {rank - 1: ((1,), torch.int64)} if rank > 0 else {}
    assert [t.item() for t in exchange(send, recv).values()] == ([rank - 1] if rank > 0 else [])
    only_rank0 = dist.new_group([0])
    if rank != 0:
        with pytest.raises(ValueError, match="not a member"):
            all_gather(x, only_rank0)


def _randn(gen, *shape):
    # Drawn on the CPU so every backend sees the same numbers, then moved to the default device.
    x = torch.randn(*shape, generator=gen, dtype=F64, device="cpu")
    return x.to(torch.get_default_device())


def _close(actual, expected, what):
    torch.testing.assert_close(
        actual, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}"
    )


def _expect_bytes(group, expected, what):
    assert comm_stats(group) == expected, (what, comm_stats(group), expected)
