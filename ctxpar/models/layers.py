"""Building blocks shared by both mixers: norms, SwiGLU, the short causal conv, the level scales."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctxpar.comm.halo import halo_exchange, valid_conv1d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32: bf16 sums of squares lose too much over wide rows.
        xf = fp32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * fp32(self.weight)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(y * silu(z)), normalised per group of ``group`` channels (one head)."""

    def __init__(self, dim: int, group: int, eps: float = 1e-5):
        super().__init__(dim, eps)
        self.group = group

    def forward(self, y, z):
        x = (fp32(y) * F.silu(fp32(z))).unflatten(-1, (-1, self.group))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.flatten(-2) * fp32(self.weight)).to(y.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Depthwise causal conv over time, x: [B, T, C], without its activation: the mixers apply the
    SiLU with their other per-token work, in token tiles.

    Under context parallelism the first ``width - 1`` inputs come from the previous rank's slice,
    which ``halo_exchange`` fetches (with autograd); on one device they are zeros.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x, cp=None):
        width = self.weight.shape[-1] - 1
        halo = x.new_zeros(x.shape[0], width, x.shape[2]) if cp is None else halo_exchange(x, width, cp.group)
        return self._conv(halo, x)

    def _conv(self, halo, x):
        return valid_conv1d(halo, x, self.weight.squeeze(1), self.bias)


class LevelScales(nn.Module):
    """lambda = softplus(Lp * (W_lambda x)) per head and level: [B, T, H, L].

    ``gain`` (Lp) starts at one and W_lambda near zero, so every level starts at softplus(0) = ln 2:
    the block begins as a uniformly weighted Mamba-2 / GDN and learns which scales matter.
    """

    def __init__(self, dim: int, heads: int, levels: int, init_std: float):
        super().__init__()
        self.heads, self.levels = heads, levels
        self.proj = nn.Linear(dim, heads * levels, bias=False)
        self.gain = nn.Parameter(torch.ones(heads, levels))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, std=self.init_std)
        nn.init.ones_(self.gain)

    def forward(self, x):
        logits = self.proj(x).unflatten(-1, (self.heads, self.levels))
        return F.softplus(self.gain * fp32(logits))


def decay(dt, dt_bias, a_log):
    """g = -softplus(dt + bias) * exp(A_log) in float32 (g <= 0), and the step softplus(dt + bias)."""
    step = F.softplus(fp32(dt) + dt_bias)
    return -step * a_log.exp(), step


def fp32(x):
    """x in float32, or wider (float64 stays float64 for exact tests); decays must not be bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def init_decay(heads: int, dt_min: float, dt_max: float):
    """Mamba-2's initialisation: dt log-uniform in [dt_min, dt_max] (stored as inverse softplus), A in [1, 16]."""
    log_dt = torch.empty(heads).uniform_(math.log(dt_min), math.log(dt_max))
    dt = log_dt.exp()
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    a_log = torch.log(torch.empty(heads).uniform_(1, 16))
    return nn.Parameter(dt_bias), nn.Parameter(a_log)
