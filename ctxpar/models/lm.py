"""Causal language model: embedding, N x (mixer + SwiGLU) pre-norm blocks, tied output head.

The head never materialises full-vocabulary logits for a whole sequence: ``token_nll`` and
``token_stats`` walk the tokens in tiles and recompute each tile's logits in backward.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctxpar.models.config import ModelConfig
from ctxpar.models.layers import RMSNorm, SwiGLU
from ctxpar.models.mixers import MIXERS
from ctxpar.models.offload import HostOffload
from ctxpar.models.tiling import token_tiled

IGNORE = -100


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[cfg.arch](cfg)
        self.mlp = None
        if cfg.ffn_width:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_width)

    def forward(self, x, cp=None, tile=None):
        """``tile``: run the per-token parts ``tile`` tokens at a time, each tile checkpointed
        (see ``tiling``); None: all at once, nothing recomputed."""
        mixed = self.mixer.mix(*token_tiled(self._project, x, tile=tile), cp=cp, tile=tile)
        return token_tiled(self._finish, x, *mixed, tile=tile)

    def per_token_stages(self) -> list[tuple[nn.Module, str]]:
        """(module, method) of each stage that looks at one token (the conv: a few neighbours)
        at a time: everything but the halo exchange and the log-linear op, which hold collectives
        and kernels of their own. What ``CausalLM.compile_per_token`` compiles."""
        return [(self, "_project"), (self.mixer.conv, "_conv"), (self.mixer, "_op_inputs"), (self, "_finish")]

    def _project(self, x):
        return self.mixer.project(self.mixer_norm(x))

    def _finish(self, x, *mixed):
        x = x + self.mixer.finish(*mixed)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.activation_checkpointing = False
        # With activation checkpointing, each block's per-token parts also run in tiles of this
        # many tokens, so recomputing a block never holds full-length per-token intermediates.
        self.token_tile = 16384
        # With activation checkpointing, keep each block's input (the float32 residual stream,
        # 4 * d_model bytes a token a layer: most of what stays on the device) in pinned host
        # memory until backward.
        self.offload_checkpoints = False
        self._init_weights()

    def compile_per_token(self, **options) -> None:
        """torch.compile every block's per-token stages (``Block.per_token_stages``), each in place
        of its method. Eager, their elementwise work (norms, gates, activations, casts) ran as
        tens of thousands of small kernels; compiled, a 1M-token training step of the 1M recipe
        on 2 H200s went from 22.5 to 12.7 s. All blocks share the compiled code (one graph per
        stage, grad mode and shape). Static shapes: a tile checkpoint's recomputation must run the
        graph its forward ran, and a dynamic graph compiled for a later, shorter tile matches the
        earlier tiles too (a benchmark that recompiled mid-run failed there: the recomputed saved
        tensors came in another order)."""
        options = {"dynamic": False, **options}
        for block in self.layers:
            for module, name in block.per_token_stages():
                setattr(module, name, torch.compile(getattr(module, name), **options))

    def _init_weights(self):
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
        for block in self.layers:
            block.mixer.levels.reset_parameters()  # W_lambda starts small, not at init_std
            # GPT-2's residual scaling: each block's writes shrink with depth so the stream stays O(1).
            outs = [block.mixer.out_proj] + ([block.mlp.down] if block.mlp is not None else [])
            for out in outs:
                nn.init.normal_(out.weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    @property
    def head_weight(self):
        return self.embed.weight  # tied

    def forward(self, input_ids, cp=None):
        """input_ids [B, T] (this rank's slice under CP) -> final hidden states [B, T, d_model]."""
        x = self.embed(input_ids)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        # Where a checkpointed block's input waits for backward (checkpoint saves its inputs as
        # saved tensors, so these hooks apply to them and not to the block's own work).
        offload = HostOffload() if checkpointing and self.offload_checkpoints else None
        for block in self.layers:
            if checkpointing:
                with offload.hooks() if offload else contextlib.nullcontext():
                    x = checkpoint(block, x, cp, self.token_tile, use_reentrant=False)
            else:
                x = block(x, cp)
        return token_tiled(self.norm, x, tile=self.token_tile if checkpointing else None)

    def logits(self, hidden):
        return hidden @ self.head_weight.to(hidden.dtype).t()

    def num_params(self, embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.embed.weight.numel()

    def flops_per_token(self, seq_len: int, chunk: int = 64) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), an estimate for MFU.

        Matmuls: 6 per weight (the tied head counted as a matmul). Mixing, per head and token:
        the intra-chunk pairs (2C(K + V)), the state update (2KV) and about log2(T/C)/2 node reads
        (2KV each) of the chunk tree.
        """
        cfg = self.cfg
        dense = 6 * (self.num_params(embedding=False) + cfg.vocab_size * cfg.d_model)
        reads = 1 + math.log2(max(seq_len / chunk, 1)) / 2
        per_head = 2 * chunk * (cfg.state_dim + cfg.head_dim) + 2 * cfg.state_dim * cfg.head_dim * reads
        return dense + 3 * cfg.n_layers * cfg.n_heads * per_head


class LMLoss(nn.Module):
    """The LM and its tiled next-token loss in one forward -> (NLL sum, labelled-token count).

    One module for the whole step, so DDP sees every parameter used and ZeRO-3 can be told about
    the tied head, which reuses the embedding outside the embedding's own forward.
    """

    def __init__(self, model: CausalLM, tile: int = 8192):
        super().__init__()
        self.model, self.tile = model, tile

    def forward(self, inputs, labels, cp=None):
        return token_nll(self.model, self.model(inputs, cp), labels, self.tile)


def token_nll(model: CausalLM, hidden, labels, tile: int = 8192):
    """(sum of next-token NLL over labelled tokens, number of labelled tokens), both float32 scalars.

    Tiles of ``tile`` tokens; each tile's logits are recomputed in backward, so peak memory is one
    tile x vocab, whatever the sequence length.
    """
    h, y = hidden.flatten(0, -2), labels.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), tile):
        total = total + checkpoint(_tile_nll, model, h[start : start + tile], y[start : start + tile], use_reentrant=False)
    return total, (y != IGNORE).sum().float()


def _tile_nll(model, h, y):
    return F.cross_entropy(model.logits(h).float(), y, ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def token_stats(model: CausalLM, hidden, labels, tile: int = 8192):
    """Per-token NLL and argmax-correctness [B, T] (NaN / False where the label is ignored)."""
    h, y = hidden.flatten(0, -2), labels.flatten()
    nll, correct = [], []
    for start in range(0, y.numel(), tile):
        logits = model.logits(h[start : start + tile]).float()
        yt = y[start : start + tile]
        n = F.cross_entropy(logits, yt.clamp(min=0), reduction="none")
        nll.append(n.masked_fill(yt == IGNORE, float("nan")))
        correct.append((logits.argmax(-1) == yt) & (yt != IGNORE))
    return torch.cat(nll).view_as(labels), torch.cat(correct).view_as(labels)
