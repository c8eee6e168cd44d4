"""Log-linear Mamba-2 / Gated DeltaNet blocks and the causal LM built from them."""

from ctxpar.models.config import ModelConfig
from ctxpar.models.io import load_pretrained, save_pretrained
from ctxpar.models.layers import GatedRMSNorm, RMSNorm, ShortConv, SwiGLU
from ctxpar.models.lm import IGNORE, Block, CausalLM, LMLoss, token_nll, token_stats
from ctxpar.models.mixers import LogLinearGDN, LogLinearMamba2

__all__ = [
    "IGNORE",
    "Block",
    "CausalLM",
    "LMLoss",
    "GatedRMSNorm",
    "LogLinearGDN",
    "LogLinearMamba2",
    "ModelConfig",
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "load_pretrained",
    "save_pretrained",
    "token_nll",
    "token_stats",
]
