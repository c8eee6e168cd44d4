"""The DP x CP layout of a training job: process group, mesh, sequence split and the CP-correct loss.

Ranks form ``dp`` groups of ``cp`` consecutive ranks (``ctxpar.comm.mesh``). Each CP group holds one
set of sequences, each rank a contiguous slice of every sequence. Parameters are replicated on all
ranks (or sharded over all of them: ``parallel.data_parallel: fsdp``, see ``fsdp``), and every rank
holds only part of each parameter's gradient, so gradients are averaged over the whole world (DDP
on the default group, or FSDP2's reduce-scatter over a mesh of the world). That average is exact
because the CP loss goes through an all-reduce whose backward sums the gradient over the CP group:
each rank ends with ``cp`` times its share, and dividing by ``dp * cp`` leaves the data-parallel
mean of per-group token means.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ctxpar.comm.launch import LaunchInfo, destroy_process_group, init_process_group_from, resolve_launch
from ctxpar.comm.mesh import Mesh, build_mesh


@dataclass
class Layout:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mesh: Mesh | None = None  # the dp x cp mesh when cp_size > 1; without CP every rank is its own CP group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.cp_size

    @property
    def cp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.cp_rank

    @property
    def dp_size(self) -> int:
        return self.world_size if self.mesh is None else self.mesh.dp_size

    @property
    def dp_rank(self) -> int:
        return self.rank if self.mesh is None else self.mesh.dp_rank

    @property
    def cp_group(self):
        return None if self.mesh is None else self.mesh.cp_group

    def cp_context(self):
        """What the model passes to the attention op and the short conv: None without CP."""
        if self.cp_size == 1:
            return None
        from ctxpar.cp import CPContext

        return CPContext(self.cp_group)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of dim 1 (the sequence). Labels must be shifted before."""
        T = x.shape[1]
        if T % self.cp_size:
            raise ValueError(f"sequence length {T} must be divisible by context_parallel_size {self.cp_size}")
        n = T // self.cp_size
        return x[:, self.cp_rank * n : (self.cp_rank + 1) * n]

    def barrier(self):
        if self.distributed:
            dist.barrier()


def setup(cp_size: int, backend: str = "auto", always_group: bool = False) -> Layout:
    """Join the job the environment describes (or a process group that already exists) and build the
    mesh. One process needs no process group unless ``always_group`` (DeepSpeed wants one)."""
    info = _existing_group() if dist.is_initialized() else resolve_launch()
    if info.world_size % cp_size:
        raise ValueError(f"context_parallel_size {cp_size} must divide the number of ranks {info.world_size}")
    if info.world_size == 1 and not dist.is_initialized() and not always_group:
        return Layout(0, 1, 0, 1, _single_device(info))
    device = init_process_group_from(info, None if backend == "auto" else backend)  # only the device if it exists
    mesh = build_mesh(info.world_size // cp_size, cp_size) if cp_size > 1 else None
    return Layout(info.rank, info.world_size, info.local_rank, info.local_world_size, device, mesh)


def _existing_group() -> LaunchInfo:
    """This rank's place in a process group created elsewhere (a test harness, another framework)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return LaunchInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)), local_world, "", 0, "torchrun")


def _single_device(info: LaunchInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def teardown(layout: Layout) -> None:
    destroy_process_group()


def cp_mean(nll_sum: torch.Tensor, count: torch.Tensor, cp_group=None) -> torch.Tensor:
    """Token-weighted mean NLL over the CP group's whole sequences (differentiable; the all-reduce's
    backward sums the gradient over the group). ``cp_group=None``: no context parallelism."""
    if cp_group is None:
        return nll_sum / count.clamp(min=1)
    from ctxpar.comm.collectives import all_reduce_sum

    total = all_reduce_sum(torch.stack([nll_sum, count.to(nll_sum.dtype)]), cp_group)
    return total[0] / total[1].clamp(min=1)


def gather_sequence(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The whole sequence [B, T, ...] from every CP rank's slice (no gradient: evaluation only)."""
    if layout.cp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(layout.cp_size)]
    dist.all_gather(parts, x.contiguous(), group=layout.cp_group)
    return torch.cat(parts, dim=1)


def mean_over_world(value: float, layout: Layout) -> float:
    """For logging: the mean of a per-rank scalar over all ranks."""
    if not layout.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=layout.device if layout.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() / layout.world_size


def cpu_threads(requested: int, local_world_size: int) -> int:
    """Threads per rank on CPU: the cores shared evenly among this node's ranks."""
    return requested or max(1, (os.cpu_count() or 1) // local_world_size)
