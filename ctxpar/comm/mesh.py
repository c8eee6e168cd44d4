"""The data-parallel x context-parallel process mesh."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a dp x cp mesh. Global rank g sits at cp_rank g % cp in CP group
    g // cp (contiguous blocks, so a sequence's ranks share a node when cp divides the GPUs per
    node) and at dp_rank g // cp in DP group g % cp (strided)."""

    cp_group: ProcessGroup
    dp_group: ProcessGroup
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int


def build_mesh(dp: int, cp: int) -> Mesh:
    """Split the initialized world of dp * cp ranks into CP and DP groups. Collective: every rank
    must call it, with the same arguments (it creates every group on every rank, in one order)."""
    world = dist.get_world_size()
    if dp < 1 or cp < 1 or dp * cp != world:
        raise ValueError(
            f"build_mesh: a dp={dp} x cp={cp} mesh needs dp * cp == world size ({world})"
        )
    rank = dist.get_rank()
    cp_blocks = [list(range(i * cp, (i + 1) * cp)) for i in range(dp)]
    cp_group, _ = dist.new_subgroups_by_enumeration(cp_blocks)
    dp_group, _ = dist.new_subgroups_by_enumeration([list(range(j, world, cp)) for j in range(cp)])
    return Mesh(cp_group, dp_group, cp_rank=rank % cp, cp_size=cp, dp_rank=rank // cp, dp_size=dp)
