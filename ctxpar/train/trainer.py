"""The training loop: one process per rank, the job described by the environment (see ``cli``)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

from ctxpar.comm.preemption import PreemptionGuard, requeue_if_slurm
from ctxpar.models import CausalLM, LMLoss, ModelConfig
from ctxpar.models.io import load_config, load_weights, save_pretrained
from ctxpar.train import checkpoint
from ctxpar.train.collection import collect_between_steps
from ctxpar.train.config import Recipe, dump
from ctxpar.train.data import Data
from ctxpar.train.parallel import Layout, cp_mean, cpu_threads, mean_over_world, setup, teardown
from ctxpar.train.telemetry import Telemetry, plot_loss


def train(recipe: Recipe) -> dict:
    """Train on this rank; every rank of the job calls it. Returns the run summary (empty off rank 0)."""
    cls = trainer_class(recipe)
    layout = setup(recipe.parallel.context_parallel_size, recipe.parallel.backend, cls.needs_process_group)
    try:
        return cls(recipe, layout).run()
    finally:
        teardown(layout)


def trainer_class(recipe: Recipe) -> type[Trainer]:
    """``engine``, and for the native engine ``parallel.data_parallel``, pick the trainer."""
    if recipe.engine == "deepspeed":  # imported only here: deepspeed is an optional extra
        from ctxpar.integrations.deepspeed_trainer import DeepSpeedTrainer

        return DeepSpeedTrainer
    if recipe.parallel.data_parallel == "fsdp":
        from ctxpar.train.fsdp import FSDPTrainer

        return FSDPTrainer
    return Trainer


def build_model(recipe: Recipe, data: Data) -> CausalLM:
    """The recipe's model. With ``train.init_from``, the checkpoint's config with the fields the
    recipe sets on top (e.g. a longer max_seq_len), holding the checkpoint's weights."""
    cfg, init = recipe.model, init_checkpoint(recipe.train.init_from)
    if init is not None:
        update = {k: getattr(cfg, k) for k in cfg.model_fields_set}
        cfg = ModelConfig.model_validate({**load_config(init).model_dump(), **update})
    if cfg.vocab_size == 0:
        cfg = cfg.model_copy(update={"vocab_size": data.tokenizer.vocab_size})
    model = CausalLM(cfg)
    if init is not None:
        load_weights(model, load_file(str(init / "model.safetensors")))
    return model


def set_activation_memory(model: CausalLM, tc) -> None:
    """The train section's activation-memory settings on the model (trainer and benchmarks alike)."""
    model.activation_checkpointing = tc.activation_checkpointing
    model.token_tile = tc.token_tile
    model.offload_checkpoints = tc.offload_checkpoints


def check_host_offload(model: CausalLM, tokens: int, layout: Layout) -> None:
    """With block inputs offloaded, fail before the first step, not halfway through a forward
    (the kernel's OOM killer takes the whole job), when the pinned host memory they need on this
    node is more than the node has available. ``tokens``: per rank and micro-batch."""
    if not (model.activation_checkpointing and model.offload_checkpoints and layout.device.type == "cuda"):
        return
    need = len(model.layers) * tokens * model.cfg.d_model * model.embed.weight.element_size() * layout.local_world_size
    available = available_host_memory()
    if available is not None and need > available:
        raise ValueError(f"train.offload_checkpoints: the block inputs of {layout.local_world_size} rank(s) need "
                         f"{need / 2**30:.1f} GiB of pinned host memory, the node has {available / 2**30:.1f} GiB "
                         "available; set train.offload_checkpoints=false (they then stay on the GPU), lower "
                         "train.micro_batch_size, or spread the ranks over more nodes")


def available_host_memory() -> int | None:
    """Bytes the kernel says are available for new allocations (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> CausalLM:
    """A fresh ``CausalLM`` holding ``state``'s tensors (built on the meta device: no initialisation,
    which would draw from the RNG that resume restores)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.load_state_dict(state, assign=True)
    return model


def init_checkpoint(path: str | None) -> Path | None:
    """A model directory, or a run directory (its latest checkpoint)."""
    if path is None:
        return None
    p = Path(path)
    found = p if (p / "config.json").exists() else checkpoint.latest(p)
    if found is None:
        raise FileNotFoundError(f"train.init_from {path!r} holds neither a model (config.json) nor checkpoints/")
    return found


def uses_bf16(recipe: Recipe, device: torch.device) -> bool:
    return recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda")


def autocast(recipe: Recipe, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(recipe, device) else contextlib.nullcontext()


class Trainer:
    """ctxpar's own engine: DDP over the world, AdamW, warmup-cosine. Subclasses that run the steps
    in another engine override ``build_engine``, ``step``, ``write_state``/``read_state`` and
    ``whole_model``; a data-parallel wrapper of this engine (``fsdp.FSDPTrainer``) overrides the
    finer hooks below them (``no_sync``, ``clip_gradients``, ``load_model``, ``optimizer_state``,
    ``load_optimizer``); data, logging, evaluation and checkpoint rotation stay here."""

    name = "native"  # recorded in every checkpoint: a run resumes only in the engine that wrote it
    needs_process_group = False

    def __init__(self, recipe: Recipe, layout: Layout):
        self.recipe, self.layout, tc = recipe, layout, recipe.train
        if layout.device.type == "cpu":
            torch.set_num_threads(cpu_threads(tc.threads, layout.local_world_size))
        self.local_batch, self.accum = _micro_batches(tc.batch_size, tc.micro_batch_size, layout.dp_size)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.data = Data(recipe.data, tc.seed)
        self.model = build_model(recipe, self.data).to(layout.device)
        set_activation_memory(self.model, tc)
        check_host_offload(self.model, tc.seq_len // layout.cp_size * self.local_batch // self.accum, layout)
        if self.compiles():
            self.model.compile_per_token()
            if layout.is_main:
                print("train.compile: the first step also compiles each block's per-token stages, so it runs longer "
                      "than the rest", flush=True)
        # FLOPs per rank and step, for MFU; counted before build_engine, which may partition the parameters
        self.flops = self.model.flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len / layout.world_size
        self.build_engine()
        self.run_dir = recipe.run_dir
        self.start_step = self._resume()

    def compiles(self) -> bool:
        """Whether the model's per-token stages run compiled (``train.compile``). auto: on GPUs
        under DDP, where it was measured; FSDP2 swaps parameters around each block's forward and
        DeepSpeed's ZeRO-3 gathers them in module hooks inside those stages, so they compile only
        when the recipe says true."""
        wanted = self.recipe.train.compile
        if wanted != "auto":
            return wanted
        ddp = self.name == "native" and self.recipe.parallel.data_parallel == "ddp"
        return self.layout.device.type == "cuda" and ddp

    def build_engine(self) -> None:
        """Wrap ``self.model`` for training: sets the loss module, ``optimizer`` and ``scheduler``."""
        self.loss = self.data_parallel(LMLoss(self.model, self.recipe.train.loss_tile))
        self.optimizer = make_optimizer(self.model, self.recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(self.recipe))

    def data_parallel(self, loss: LMLoss) -> nn.Module:
        """The loss module wrapped to average gradients over the world (see ``parallel``)."""
        return DDP(loss, device_ids=_device_ids(self.layout)) if self.layout.distributed else loss

    def _resume(self) -> int:
        if self.layout.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump(self.recipe))
        self.layout.barrier()
        last = checkpoint.latest(self.run_dir) if self.recipe.train.resume else None
        step = 0 if last is None else checkpoint.load(last, self.read_state, self.layout, self.name)
        if step and self.layout.is_main:
            print(f"resuming from {last} (step {step})", flush=True)
        return step

    def save(self, step: int) -> Path:
        """Collective: the checkpoint of ``step`` (atomic; the oldest beyond train.keep_last go)."""
        keep = self.recipe.train.keep_last
        return checkpoint.save(self.run_dir, step, self.write_state, self.layout, keep, self.name)

    def write_state(self, directory: Path) -> None:
        """Every rank: this engine's state into a checkpoint directory being written."""
        self.write_model(directory)
        optimizer = self.optimizer_state()
        if self.layout.is_main:
            state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}
            torch.save(state, directory / "trainer.pt")

    def read_state(self, directory: Path) -> None:
        self.load_model(load_file(str(directory / "model.safetensors"), device=str(self.layout.device)))
        state = torch.load(directory / "trainer.pt", map_location=self.layout.device, weights_only=False)
        self.load_optimizer(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def load_model(self, state: dict[str, torch.Tensor]) -> None:
        """Collective: the whole weights (``model.safetensors``) into the model."""
        load_weights(self.model, state)

    def optimizer_state(self) -> dict:
        """Collective: the optimizer's whole state, as rank 0 writes it into ``trainer.pt``."""
        return self.optimizer.state_dict()

    def load_optimizer(self, state: dict) -> None:
        """Collective: ``optimizer_state``'s dict (read by every rank) into the optimizer."""
        self.optimizer.load_state_dict(state)

    def write_model(self, directory: Path) -> None:
        """The weights as a model directory (``load_pretrained``, ``train.init_from``, ``ctxpar eval``)."""
        model = self.whole_model()
        if self.layout.is_main:
            save_pretrained(model, directory)

    def whole_model(self) -> CausalLM:
        """Collective: the model with every parameter whole on this rank (for saving and evaluation)."""
        return self.model

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step; returns (loss, gradient norm before clipping)."""
        loss = self.forward_backward(step)
        grad_norm = self.clip_gradients(self.recipe.optim.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def clip_gradients(self, max_norm: float) -> float:
        """Scale the gradients to norm at most ``max_norm``; returns their norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()

    def no_sync(self):
        """A context in which backward accumulates gradients on this rank without averaging them."""
        return self.loss.no_sync() if self.layout.distributed else contextlib.nullcontext()

    def forward_backward(self, step: int) -> float:
        """Accumulate the gradient of ``step``'s batch (its loss: the DP mean of CP token means)."""
        lay = self.layout
        cp, total = lay.cp_context(), 0.0
        for i, (x, y) in enumerate(self.micro_batches(step)):
            last = i == self.accum - 1
            with contextlib.nullcontext() if last else self.no_sync():
                with autocast(self.recipe, lay.device):
                    loss = cp_mean(*self.loss(x, y, cp), lay.cp_group) / self.accum
                loss.backward()
            total += loss.item()
        return mean_over_world(total, lay)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (inputs, labels) micro-batches of ``step``: its DP rows, its CP slice."""
        tc, lay = self.recipe.train, self.layout
        inputs, labels = self.data.batch(step, tc.batch_size, tc.seq_len)
        rows = slice(lay.dp_rank * self.local_batch, (lay.dp_rank + 1) * self.local_batch)
        inputs, labels = lay.split(inputs[rows]).to(lay.device), lay.split(labels[rows]).to(lay.device)
        return list(zip(inputs.chunk(self.accum), labels.chunk(self.accum)))

    def run(self) -> dict:
        tc, lay = self.recipe.train, self.layout
        telemetry = Telemetry(self.recipe, lay, self.flops, self.start_step)
        losses, start = [], time.perf_counter()
        with PreemptionGuard() as guard:
            last = self._loop(guard, telemetry, losses)
            if last > self.start_step:
                self.save(last)
            if last < tc.steps:  # preempted: checkpoint written; inside the guard, as requeue needs
                requeue_if_slurm()
        telemetry.close()
        if last < tc.steps:
            return {"preempted_at": last} if lay.is_main else {}
        return self._finish(losses, time.perf_counter() - start)

    def _loop(self, guard, telemetry, losses: list) -> int:
        """Steps until the end or until any rank is told to stop; returns the steps completed."""
        tc = self.recipe.train
        with collect_between_steps(tc.gc_every) as boundary:
            for step in range(self.start_step, tc.steps):
                boundary(step)
                loss, grad_norm = self.step(step)
                losses.append(loss)
                telemetry.record(step + 1, loss, grad_norm, self.scheduler.get_last_lr()[0])
                if guard.should_stop():
                    return step + 1
                if tc.ckpt_every and (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                    self.save(step + 1)
        return tc.steps

    def _finish(self, losses: list[float], wall: float) -> dict:
        from ctxpar.train.evaluate import evaluate

        lay, model = self.layout, self.whole_model()
        results = evaluate(model, self.data, self.recipe, lay, self.run_dir / "eval")
        summary = {"run_dir": str(self.run_dir), "steps": self.recipe.train.steps, "resumed_from": self.start_step,
                   "params": model.num_params(), "loss_first": losses[0] if losses else None,
                   "loss_last": losses[-1] if losses else None, "train_wall_s": wall, **results}
        if lay.is_main:
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary if lay.is_main else {}


def _micro_batches(batch_size: int, micro: int, dp: int) -> tuple[int, int]:
    """(sequences per DP rank, micro-batches per step)."""
    if batch_size % dp:
        raise ValueError(f"train.batch_size {batch_size} must be divisible by the data-parallel size {dp}")
    local = batch_size // dp
    micro = micro or local
    if local % micro:
        raise ValueError(f"train.micro_batch_size {micro} must divide the per-rank batch {local}")
    return local, local // micro


def _device_ids(layout: Layout):
    return [layout.device.index] if layout.device.type == "cuda" else None


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    oc = recipe.optim
    return torch.optim.AdamW(param_groups(model, recipe), lr=oc.lr, betas=oc.betas, eps=oc.eps)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Weight matrices decay; norms, biases, conv filters, decay rates and level gains do not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = lambda name, p: p.dim() == 2 and not name.endswith("levels.gain")  # noqa: E731
    return [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": recipe.optim.weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]


def lr_schedule(recipe: Recipe):
    """Multiplier of the base lr: linear warmup, then cosine down to min_lr_ratio at the last step."""
    oc, steps = recipe.optim, recipe.train.steps

    def factor(step: int) -> float:
        if step < oc.warmup_steps:
            return (step + 1) / oc.warmup_steps
        progress = min(1.0, (step - oc.warmup_steps) / max(1, steps - oc.warmup_steps))
        return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
