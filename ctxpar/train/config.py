"""Recipes: YAML validated by pydantic, with ``--set a.b=value`` overrides.

Every section forbids unknown keys, so a typo fails at load time with the key's dotted path
instead of silently training with a default.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ctxpar.models.config import ModelConfig

DEFAULT_RECIPE = "quickstart.yaml"
# Other names a key is known by; an override under the alias replaces the key itself.
ALIASES = {"sequence_parallel_size": "context_parallel_size"}
# DeepSpeed config keys that ctxpar derives, and what it derives each from.
DEEPSPEED_DERIVED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size and train.micro_batch_size",
    "sequence_parallel_size": "parallel.context_parallel_size",
    "data_parallel_size": "the number of ranks and parallel.context_parallel_size",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision (bf16 or fp32; fp16 is not supported)",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataConfig(_Section):
    source: Literal["passkey", "mqar", "bin", "jsonl"] = "passkey"
    path: str | None = Field(None, description="the .bin or .jsonl file for source bin / jsonl")
    dtype: Literal["uint16", "uint32"] = "uint16"
    tokenizer: str = Field("builtin", description="'builtin' or a local tokenizer.json / directory")
    text_field: str = "text"
    loss_on: Literal["answer", "all"] = Field("answer", description="score only task answers, or every token")
    passkey_digits: int = Field(5, gt=0)
    mqar_pairs: int = Field(8, gt=0, le=26)

    @model_validator(mode="after")
    def _path(self):
        if self.source in ("bin", "jsonl") and not self.path:
            raise ValueError(f"data.path is required for data.source = {self.source!r}")
        return self


class TrainConfig(_Section):
    steps: int = Field(200, gt=0)
    seq_len: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0, description="sequences per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = Field(0, ge=0, description="sequences per rank per forward; 0: batch_size / dp")
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    activation_checkpointing: bool = False
    token_tile: int = Field(16384, gt=0, description="with activation_checkpointing: tokens per tile of a block's "
                            "per-token parts (norms, projections, MLP), recomputed tile by tile in backward")
    offload_checkpoints: bool = Field(False, description="with activation_checkpointing: each block's checkpointed "
                                      "input waits for backward in pinned host memory, copied there and back on a "
                                      "side stream (GPU memory / host memory trade)")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile each block's per-token stages (norms, "
                                            "gates, activations, the short conv); auto: on GPUs under the native DDP")
    loss_tile: int = Field(8192, gt=0, description="tokens per logits tile of the loss")
    gc_every: int = Field(1, ge=0, description="Python's cyclic garbage collection only between steps, every this "
                          "many (the same step on every rank, not mid-step at random); 0: automatic")
    log_every: int = Field(10, gt=0)
    ckpt_every: int = Field(0, ge=0, description="0: only at the end")
    keep_last: int = Field(2, gt=0)
    resume: bool = Field(True, description="continue from the run's latest checkpoint when there is one")
    init_from: str | None = Field(None, description="a checkpoint or model directory to start the weights from")
    threads: int = Field(0, ge=0, description="torch threads per rank on CPU; 0: cores / local ranks")


class OptimConfig(_Section):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0, description="0: no clipping")


class ParallelConfig(_Section):
    nproc: int | Literal["auto"] = Field("auto", description="ranks to launch without a launcher; auto: GPUs, or 2 on CPU")
    context_parallel_size: int = Field(
        1, gt=0, validation_alias=AliasChoices("context_parallel_size", *[k for k, v in ALIASES.items() if v == "context_parallel_size"])
    )
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    data_parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="native engine: DDP (replicated parameters) or FSDP2 (sharded over all ranks)"
    )


class EvalConfig(_Section):
    passkey_lengths: list[int] = Field(default_factory=list, description="empty: the training length")
    passkey_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = Field(8, gt=0, description="passkey prompts per (length, depth) cell")
    heldout_batches: int = Field(2, ge=0, description="held-out batches for loss by position")


class TelemetryConfig(_Section):
    peak_tflops: float | None = Field(None, description="per device, for MFU; None: known GPUs only")
    nvml: bool = True
    progress_bar: bool = True


class Recipe(_Section):
    name: str = "run"
    out_dir: str = "runs"
    engine: Literal["native", "deepspeed"] = Field(
        "native", description="who runs the steps: ctxpar's trainer or DeepSpeed (with the deepspeed block)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="handed to DeepSpeed's config (engine: deepspeed), e.g. zero_optimization"
    )

    @field_validator("deepspeed")
    @classmethod
    def _no_derived_keys(cls, block: dict) -> dict:
        # One source of truth: a value DeepSpeed would take from the block could silently disagree
        # with the recipe key that the data, the schedule and the logs follow.
        for key in block:
            if key in DEEPSPEED_DERIVED:
                raise ValueError(f"deepspeed.{key} is set by ctxpar from {DEEPSPEED_DERIVED[key]}: remove it")
        return block

    @model_validator(mode="after")
    def _fsdp_is_native(self):
        if self.engine == "deepspeed" and self.parallel.data_parallel != "ddp":
            raise ValueError("parallel.data_parallel = fsdp is the native engine's; with engine deepspeed, "
                             "shard with deepspeed.zero_optimization.stage")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


class RecipeError(ValueError):
    """A recipe or override is invalid; the message names the offending key."""


def load_recipe(path: str | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe at ``path`` (None: the embedded quickstart) with ``key=value`` overrides applied."""
    text = _default_text() if path is None else Path(path).read_text()
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path or DEFAULT_RECIPE}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, path or DEFAULT_RECIPE)


def validate(raw: dict, origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '(recipe)'}: {err['msg']}" for err in e.errors()]
        raise RecipeError(f"invalid recipe {origin}:\n  " + "\n  ".join(lines)) from None


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` sets raw[a][b][c]; the value is parsed as YAML (numbers, lists, booleans)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set expects key=value, got {item!r}")
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {p!r} is not a section")
    node[ALIASES.get(leaf, leaf)] = yaml.safe_load(value)


def _default_text() -> str:
    return resources.files("ctxpar.train").joinpath("recipes", DEFAULT_RECIPE).read_text()


def dump(recipe: Recipe) -> str:
    """The recipe as YAML, only the keys that were set: reloading it keeps "unset" meaning "default"."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_unset=True), sort_keys=False)
