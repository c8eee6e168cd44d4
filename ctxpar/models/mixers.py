"""Log-linear token mixers: Mamba-2 and Gated DeltaNet blocks around the public ops.

Both take ``cp`` (a CPContext or None): with it, x is this rank's slice of the sequence, the short
conv fetches its halo from the previous rank and the op exchanges Fenwick states; nothing else in
the block looks across tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctxpar.kernels import log_linear_gdn, log_linear_mamba2
from ctxpar.models.config import ModelConfig
from ctxpar.models.layers import GatedRMSNorm, LevelScales, ShortConv, decay, init_decay
from ctxpar.models.tiling import token_tiled


class TokenMixer(nn.Module):
    """A mixer in three stages, so that a block can run the per-token ones in token tiles:
    ``project`` (per token, from the normed input), ``mix`` (the short conv and the log-linear op,
    the only parts that look across tokens; between them ``_op_inputs``, per token, makes the op's
    inputs) and ``finish`` (per token, back to d_model)."""

    def forward(self, u, cp=None):
        return self.finish(*self.mix(*self.project(u), cp=cp))


class LogLinearMamba2(TokenMixer):
    """in_proj -> (z, x, B, C, dt); short conv on x/B/C; log-linear SSD; gated RMSNorm; out_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, P, Hk, N = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.state_dim
        self.sizes = [H * P, H * P, Hk * N, Hk * N, H]  # z, x, B, C, dt
        self.in_proj = nn.Linear(cfg.d_model, sum(self.sizes), bias=False)
        self.conv = ShortConv(H * P + 2 * Hk * N, cfg.conv_width)
        self.levels = LevelScales(cfg.d_model, H, cfg.num_levels, cfg.lambda_init_std)
        self.dt_bias, self.A_log = init_decay(H, cfg.dt_min, cfg.dt_max)
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(H * P, P, cfg.norm_eps)
        self.out_proj = nn.Linear(H * P, cfg.d_model, bias=False)

    def project(self, u):
        z, xbc, dt = self.in_proj(u).split([self.sizes[0], sum(self.sizes[1:4]), self.sizes[4]], dim=-1)
        return z, xbc, dt, self.levels(u)

    def mix(self, z, xbc, dt, lam, cp=None, tile=None):
        xbc = self.conv(xbc, cp)
        q, k, v, g = token_tiled(self._op_inputs, xbc, dt, tile=tile)
        y, _ = log_linear_mamba2(q, k, v, g, lam, cp=cp, backend=self.cfg.backend)
        return y, xbc, z

    def finish(self, y, xbc, z):
        x = self._activate(xbc)[0]  # recomputed from the conv output rather than kept beside it
        y = y + x * self.D.unsqueeze(-1).to(x.dtype)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _op_inputs(self, xbc, dt):
        cfg = self.cfg
        x, b, c = self._activate(xbc)
        g, step = decay(dt, self.dt_bias, self.A_log)
        # Mamba-2's discretisation: the input enters scaled by the same step that sets its decay.
        v = x * step.unsqueeze(-1).to(x.dtype)
        return c.unflatten(-1, (cfg.n_groups, cfg.state_dim)), b.unflatten(-1, (cfg.n_groups, cfg.state_dim)), v, g

    def _activate(self, xbc):
        """The conv's SiLU, split into x [.., H, P], B and C."""
        x, b, c = F.silu(xbc).split(self.sizes[1:4], dim=-1)
        return x.unflatten(-1, (self.cfg.n_heads, self.cfg.head_dim)), b, c


class LogLinearGDN(TokenMixer):
    """q/k/v projections; short conv; L2-normalised q, k; beta = sigmoid; log-linear gated delta rule;
    per-head RMSNorm gated by an output projection; o_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, V, Hk, K = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.state_dim
        self.sizes = [Hk * K, Hk * K, H * V]  # q, k, v
        self.qkv = nn.Linear(cfg.d_model, sum(self.sizes), bias=False)
        self.gates = nn.Linear(cfg.d_model, 2 * H + H * V, bias=False)  # dt, beta, output gate
        self.conv = ShortConv(sum(self.sizes), cfg.conv_width)
        self.levels = LevelScales(cfg.d_model, H, cfg.num_levels, cfg.lambda_init_std)
        self.dt_bias, self.A_log = init_decay(H, cfg.dt_min, cfg.dt_max)
        self.norm = GatedRMSNorm(H * V, V, cfg.norm_eps)
        self.out_proj = nn.Linear(H * V, cfg.d_model, bias=False)

    def project(self, u):
        H = self.cfg.n_heads
        dt, beta, gate = self.gates(u).split([H, H, H * self.cfg.head_dim], dim=-1)
        return self.qkv(u), dt, beta, gate, self.levels(u)

    def mix(self, qkv, dt, beta, gate, lam, cp=None, tile=None):
        q, k, v, g, beta = token_tiled(self._op_inputs, self.conv(qkv, cp), dt, beta, tile=tile)
        o, _ = log_linear_gdn(q, k, v, g, beta, lam, cp=cp, backend=self.cfg.backend)
        return o, gate

    def finish(self, o, gate):
        return self.out_proj(self.norm(o.flatten(-2), gate))

    def _op_inputs(self, qkv, dt, beta):
        cfg = self.cfg
        q, k, v = F.silu(qkv).split(self.sizes, dim=-1)
        # In v's dtype: compiled under autocast, the norm's float32 made q and k float32.
        q = F.normalize(q.unflatten(-1, (cfg.n_groups, cfg.state_dim)), dim=-1).to(v.dtype)
        k = F.normalize(k.unflatten(-1, (cfg.n_groups, cfg.state_dim)), dim=-1).to(v.dtype)
        g, _ = decay(dt, self.dt_bias, self.A_log)
        return q, k, v.unflatten(-1, (cfg.n_heads, cfg.head_dim)), g, beta.sigmoid()


MIXERS = {"mamba2": LogLinearMamba2, "gdn": LogLinearGDN}
