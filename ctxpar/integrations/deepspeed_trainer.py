"""``ctxpar train`` with ``engine: deepspeed``: the recipe's steps run in a DeepSpeed engine.

The ctxpar ``Trainer`` keeps the data, logging, evaluation and checkpoint rotation; this subclass
only builds the engine, runs a step through it and saves / restores the engine's state. The
DeepSpeed config is the recipe's ``deepspeed:`` block plus what ctxpar derives from the recipe:
the batch arithmetic of the DP x CP job, ``bf16`` from ``train.precision`` and
``gradient_clipping`` from ``optim.grad_clip``.

Optimizer and schedule: the block's ``optimizer`` / ``scheduler`` when it has them (DeepSpeed's
fused, offloaded or other optimizers), else ctxpar's AdamW (no decay on norms, gains and decay
rates) and warmup-cosine as client objects, so that the same recipe trains the same way on both
engines. A block optimizer still gets ctxpar's parameter groups and, without a block scheduler,
ctxpar's schedule.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

from ctxpar.integrations.deepspeed import (
    ContextParallelMPU,
    batch_config,
    skip_shm_comm_build,
    zero3_loss_module,
    zero_scaled,
)
from ctxpar.models import CausalLM
from ctxpar.train.config import Recipe
from ctxpar.train.parallel import Layout, cp_mean, mean_over_world
from ctxpar.train.trainer import Trainer, lr_schedule, make_optimizer, model_from_state, param_groups, uses_bf16

TAG = "deepspeed"  # the engine's subdirectory inside a ctxpar checkpoint


class DeepSpeedTrainer(Trainer):
    name = "deepspeed"
    needs_process_group = True  # DeepSpeed wants one even for a single rank

    def build_engine(self) -> None:
        recipe, layout = self.recipe, self.layout
        if layout.device.type == "cpu":
            skip_shm_comm_build()
        config = engine_config(recipe, layout, self.local_batch // self.accum, self.accum)
        client_optimizer = "optimizer" not in recipe.deepspeed
        module = zero3_loss_module(self.model, recipe.train.loss_tile)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=param_groups(self.model, recipe),
            optimizer=make_optimizer(self.model, recipe) if client_optimizer else None,
            lr_scheduler=None if "scheduler" in recipe.deepspeed else _warmup_cosine(recipe),
            config=config,
            mpu=ContextParallelMPU(layout.mesh) if layout.cp_size > 1 else None,
        )

    def step(self, step: int) -> tuple[float, float | None]:
        """One optimizer step; returns (loss, the gradient norm DeepSpeed measured, if any)."""
        lay, stage = self.layout, self.engine.zero_optimization_stage()
        cp, total = lay.cp_context(), 0.0
        for x, y in self.micro_batches(step):
            mean = cp_mean(*self.engine(x, y, cp), lay.cp_group)
            self.engine.backward(zero_scaled(mean, lay.cp_size, stage))  # divides by the accumulation steps
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            total += mean.item() / self.accum
        norm = self.engine.get_global_grad_norm()
        return mean_over_world(total, lay), None if norm is None else float(norm)

    def write_state(self, directory: Path) -> None:
        self.write_model(directory)
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def read_state(self, directory: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=TAG)
        if loaded is None:  # DeepSpeed only warns
            raise FileNotFoundError(f"{directory / TAG} holds no DeepSpeed checkpoint")

    def whole_model(self) -> CausalLM:
        """ZeRO-3 partitions the parameters: gather a whole copy (collective); other stages hold them whole."""
        if self.engine.zero_optimization_stage() < 3:
            return self.model
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return model_from_state(self.model.cfg, state)


def engine_config(recipe: Recipe, layout: Layout, micro_batch: int, accum: int) -> dict:
    """The recipe's ``deepspeed:`` block plus what ctxpar derives from the rest of the recipe."""
    config = batch_config(recipe.deepspeed, micro_batch, accum, layout.dp_size, layout.cp_size)
    config["gradient_clipping"] = recipe.optim.grad_clip  # 0: DeepSpeed does not clip either
    config["bf16"] = {"enabled": uses_bf16(recipe, layout.device)}
    if "optimizer" not in config:
        # ctxpar's AdamW is element-wise, so ZeRO's flattened partitions update it exactly.
        config.setdefault("zero_allow_untested_optimizer", True)
    elif layout.device.type == "cpu" and config["optimizer"].get("type", "").lower() in ("adam", "adamw"):
        # DeepSpeed's own Adam would JIT-compile a C++ op (~100 s); torch's computes the same.
        optimizer = config["optimizer"]
        config["optimizer"] = {**optimizer, "params": {"torch_adam": True, **optimizer.get("params", {})}}
    return config


def _warmup_cosine(recipe: Recipe):
    """ctxpar's schedule for whichever optimizer DeepSpeed ends up with (DeepSpeed calls it)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(recipe))
