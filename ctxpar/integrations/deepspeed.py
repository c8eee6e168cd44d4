"""Context-parallel log-linear attention inside a DeepSpeed engine.

A DeepSpeed script gains context parallelism in a few lines::

    from ctxpar.integrations.deepspeed import cp_loss, setup_context_parallel, split_batch, zero3_loss_module

    cpx = setup_context_parallel(cp_size=2)                    # groups, mpu, CPContext
    config = cpx.deepspeed_config(base_config, micro_batch=1, grad_accum=1)
    model = zero3_loss_module(causal_lm)                        # the loss inside forward (ZeRO-3)
    engine, *_ = deepspeed.initialize(model=model, config=config, mpu=cpx.mpu,
                                      model_parameters=model.parameters())
    ids, labels = split_batch(batch, cpx.cp_rank, cpx.cp_size)  # labels shifted before the split
    loss = cp_loss(*engine(ids, labels, cp=cpx.context), cpx, engine.zero_optimization_stage())
    engine.backward(loss); engine.step()

DeepSpeed finds a sequence-parallel group by duck typing the ``mpu``: the marker
``initialize_sequence_parallel`` plus ``get_sequence_parallel_*`` and
``get_sequence_data_parallel_*``. ZeRO then shards and averages gradients over the sequence x data
parallel group (the whole DP x CP world here). The mpu must not define
``get_data_parallel_world_size``, and the config must not set ``data_parallel_size``.

``ctxpar train`` with ``engine: deepspeed`` in the recipe builds on these (``deepspeed_trainer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from ctxpar.comm.mesh import Mesh, build_mesh
from ctxpar.models import CausalLM, LMLoss
from ctxpar.train.parallel import cp_mean

IGNORE_INDEX = -100


class ContextParallelMPU:
    """The mpu DeepSpeed queries for its sequence-parallel (here: context-parallel) groups."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def initialize_sequence_parallel(self):
        """Marker: its presence tells DeepSpeed that this mpu describes sequence parallelism."""

    def get_sequence_parallel_group(self):
        return self.mesh.cp_group

    def get_sequence_parallel_world_size(self):
        return self.mesh.cp_size

    def get_sequence_parallel_rank(self):
        return self.mesh.cp_rank

    # ZeRO shards and reduces over every rank that holds a different slice of the data.
    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self):
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self):
        return dist.get_rank()

    # Gradient-norm reductions count replicated parameters on model-parallel rank 0 only and sum
    # over the model-parallel group; the CP group is exactly such a group of replicas.
    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


@dataclass
class ContextParallelSetup:
    mesh: Mesh
    mpu: ContextParallelMPU
    context: object  # the CPContext passed as cp= to the model (None when cp_size == 1)

    @property
    def cp_rank(self) -> int:
        return self.mesh.cp_rank

    @property
    def cp_size(self) -> int:
        return self.mesh.cp_size

    def deepspeed_config(self, base: dict, micro_batch: int, grad_accum: int = 1) -> dict:
        """``base`` plus the batch arithmetic of this DP x CP job (see ``batch_config``)."""
        return batch_config(base, micro_batch, grad_accum, self.mesh.dp_size, self.mesh.cp_size)


def batch_config(base: dict, micro_batch: int, grad_accum: int, dp_size: int, cp_size: int) -> dict:
    """``base`` plus the batch arithmetic of a DP x CP job: only DP ranks see distinct sequences,
    so train_batch_size = micro * accum * world / cp."""
    if "data_parallel_size" in base:
        raise ValueError("do not set data_parallel_size with a context-parallel mpu: DeepSpeed derives it")
    return {
        **base,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp_size,
        "sequence_parallel_size": cp_size,
    }


def setup_context_parallel(cp_size: int, scheme: str = "allgather") -> ContextParallelSetup:
    """Build the DP x CP mesh on the initialised world, its mpu and the CPContext. Collective."""
    world = dist.get_world_size()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"context parallel size {cp_size} must divide the world size {world}")
    mesh = build_mesh(world // cp_size, cp_size)
    context = None
    if cp_size > 1:
        from ctxpar.cp import CPContext

        context = CPContext(mesh.cp_group, scheme=scheme)
    return ContextParallelSetup(mesh, ContextParallelMPU(mesh), context)


def zero3_loss_module(lm: CausalLM, tile: int = 8192) -> LMLoss:
    """The LM with its loss in one forward, its tied head registered with ZeRO-3: ZeRO-3 gathers a
    parameter only inside the forward of a module that owns or registers it."""
    module = LMLoss(lm, tile)
    deepspeed.zero.register_external_parameter(module, lm.head_weight)
    return module


def split_batch(input_ids: torch.Tensor, cp_rank: int, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of (input_ids, next-token labels). Labels are shifted on the whole
    sequence first, so the last token of a slice still predicts the first token of the next."""
    T = input_ids.shape[1]
    if T % cp_size:
        raise ValueError(f"sequence length {T} is not divisible by the context parallel size {cp_size}")
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE_INDEX)], dim=1)
    n = T // cp_size
    part = slice(cp_rank * n, (cp_rank + 1) * n)
    return input_ids[:, part], labels[:, part]


def cp_loss(nll_sum: torch.Tensor, count: torch.Tensor, setup: ContextParallelSetup, zero_stage: int) -> torch.Tensor:
    """The loss to hand to ``engine.backward`` so gradients equal single-process gradients.

    Its value is the token-weighted mean NLL of the CP group's whole sequences. Its backward runs
    through an all-reduce that sums the gradient over the CP group, so each rank holds cp times its
    share. ZeRO 0-2 then average over the DP x CP ranks and multiply by cp (DeepSpeed treats
    sequence-parallel ranks as one data-parallel replica), which over-counts by cp: divide it out.
    ZeRO 3 averages over all DP x CP ranks without that factor, which is exactly right.
    """
    return zero_scaled(cp_mean(nll_sum, count, setup.mesh.cp_group), setup.cp_size, zero_stage)


def zero_scaled(mean: torch.Tensor, cp_size: int, zero_stage: int) -> torch.Tensor:
    """The CP group's mean loss scaled for ``zero_stage`` (see ``cp_loss``)."""
    return mean if zero_stage == 3 else mean / cp_size


def skip_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed's first ``initialize`` JIT-compiles a shared-memory
    all-reduce (~60 s) that only inference uses; training communicates through gloo. Call it
    before ``initialize``."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
