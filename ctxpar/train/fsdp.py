"""``parallel.data_parallel: fsdp``: the native trainer with FSDP2 (``fully_shard``) instead of DDP.

Every transformer block, and the root loss module (the embedding with the tied head, the final
norm), is sharded over a 1-D mesh of the whole world: parameters, gradients and AdamW state are
split over the DP x CP ranks, like ZeRO-3. The whole world and not only the DP group, because every
rank holds a partial gradient of every parameter (the part its slice of the sequences contributes),
so the gradient is a sum over the CP ranks as well as over the DP groups; FSDP's reduce-scatter over
the world takes the same world mean as DDP's all-reduce (see ``parallel``), so the loss scaling,
the losses and the gradients are DDP's.

The tied head: the loss reuses ``embed.weight`` outside the embedding's forward, and again when a
checkpointed loss tile recomputes its logits in backward. So the embedding is no FSDP module of its
own (that would reshard it after its forward, and the head would meet a shard: "mixed torch.Tensor
and DTensor"); it belongs to the root, whose parameters are whole throughout the root's forward,
which runs the loss, and, with ``reshard_after_forward=False``, stay whole to the end of its
backward, where the loss tiles are recomputed.

Checkpoints hold what DDP's hold: the whole weights in ``model.safetensors`` and the whole
optimizer state in ``trainer.pt`` (gathered with ``torch.distributed.checkpoint.state_dict``), so
a run may resume with the other wrapper, or on another number of ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ctxpar.models import CausalLM, LMLoss
from ctxpar.train.trainer import Trainer, model_from_state

WHOLE = StateDictOptions(full_state_dict=True)  # every rank gets (or gives) every tensor whole


class FSDPTrainer(Trainer):
    name = "native"  # the same checkpoint files as DDP's
    needs_process_group = True  # the mesh, even for a single rank

    def data_parallel(self, loss: LMLoss) -> nn.Module:
        mesh = init_device_mesh(self.layout.device.type, (self.layout.world_size,))
        for block in self.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(loss, mesh=mesh, reshard_after_forward=False)  # the tied head: see the module doc

    @contextlib.contextmanager
    def no_sync(self):
        self.loss.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.loss.set_requires_gradient_sync(True)

    def clip_gradients(self, max_norm: float) -> float:
        """The norm of the whole gradient: each rank's shard norms combined over the mesh."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.item()

    def whole_model(self) -> CausalLM:
        """Collective: a plain ``CausalLM`` holding the whole weights, on every rank."""
        state = get_model_state_dict(self.model, options=WHOLE)
        return model_from_state(self.model.cfg, state).to(self.layout.device)

    def load_model(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state, options=WHOLE)

    def optimizer_state(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=WHOLE)

    def load_optimizer(self, state: dict) -> None:
        """The saved parameters matched by position, as ``Optimizer.load_state_dict`` does: DDP's
        checkpoints key them by index, these by name."""
        owner = {p: name for name, p in self.model.named_parameters()}
        names = [owner[p] for group in self.optimizer.param_groups for p in group["params"]]
        rename = dict(zip([k for group in state["param_groups"] for k in group["params"]], names, strict=True))
        state = {"state": {rename[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**group, "params": [rename[k] for k in group["params"]]}
                                  for group in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, state, options=WHOLE)
