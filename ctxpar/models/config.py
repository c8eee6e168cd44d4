"""Model configuration (pydantic): one schema for both mixers, validated once at construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ctxpar.kernels.levels import num_levels


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["mamba2", "gdn"] = "mamba2"
    vocab_size: int = Field(0, ge=0, description="0: the training data's tokenizer decides")
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(8, gt=0, description="value heads H")
    n_groups: int = Field(1, gt=0, description="query/key groups Hk; must divide n_heads")
    head_dim: int = Field(64, gt=0, description="value width V per head")
    state_dim: int = Field(64, gt=0, description="query/key width K")
    expand: int = Field(2, gt=0, description="Mamba-2 inner width = expand * d_model = n_heads * head_dim")
    conv_width: int = Field(4, gt=0)
    mlp_hidden: int = Field(-1, description="SwiGLU width; -1: 8/3 d_model rounded to 64; 0: no MLP")
    max_seq_len: int = Field(4096, gt=0, description="longest sequence; fixes the number of lambda levels")
    dt_min: float = Field(1e-3, gt=0, description="initial decay steps are log-uniform in [dt_min, dt_max]")
    dt_max: float = Field(1e-1, gt=0)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    lambda_init_std: float = Field(1e-3, description="W_lambda starts small, so every level starts at softplus(0)")
    backend: Literal["auto", "torch", "reference", "triton"] = "auto"

    @model_validator(mode="after")
    def _check(self):
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_groups ({self.n_groups}) must divide n_heads ({self.n_heads})")
        if self.arch == "mamba2" and self.n_heads * self.head_dim != self.expand * self.d_model:
            raise ValueError(
                f"mamba2 needs n_heads * head_dim == expand * d_model, got {self.n_heads} * {self.head_dim} "
                f"!= {self.expand} * {self.d_model}"
            )
        return self

    @property
    def num_levels(self) -> int:
        return num_levels(self.max_seq_len)

    @property
    def ffn_width(self) -> int:
        if self.mlp_hidden >= 0:
            return self.mlp_hidden
        return 64 * ((8 * self.d_model // 3 + 63) // 64)
