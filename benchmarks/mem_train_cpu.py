"""Peak memory per token of one training step (forward + backward) of the 1M recipe's model.

The recipe's widths (d_model 1024, 32 x 64 heads, state 128, SwiGLU 2816, 21 levels), bf16 autocast,
activation checkpointing per block and the tiled loss, as the trainer runs it; fewer layers and a
small vocabulary by default, so it fits a CPU. The per-token figure that matters is the slope
between consecutive lengths (fixed costs such as parameter gradients and one token tile's
transients cancel); "24-layer slope" adds the residual-stream checkpoints of the missing layers
(d_model float32 each), which is all a layer adds outside the block being recomputed.

How memory is counted:
  cpu:  live bytes of every storage an op returns, tracked by a TorchDispatchMode from creation to
        release (a weakref on the storage): an exact allocator-free peak that does not depend on
        the allocator or on what else runs. Parameter gradients are dropped as they are made (see
        ``drop_gradients``): the figures are activations only. By default the log-linear op is a stand-in that saves
        the same inputs and returns the same output per token (``--op stub``), so the figures are
        the model's and exclude the op's own internals; ``--op real`` runs backend "torch".
  cuda: torch.cuda.max_memory_allocated minus the memory allocated before the step (parameter
        gradients and the real Triton op's internals included; weights and optimizer state not).

    python benchmarks/mem_train_cpu.py                         # CPU, T = 4K, 8K, 16K, 2 layers
    python benchmarks/mem_train_cpu.py --device cuda --layers 24 --tokens 65536,131072,262144,524288
    python benchmarks/mem_train_cpu.py --device cuda --layers 24 --tokens 65536,131072,262144,524288 --offload

Writes JSON to $OUT (if set) or benchmarks/results/<date>-<device>-mem_train[-<label>].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ctxpar.models.mixers
from ctxpar.models import CausalLM, token_nll
from ctxpar.train.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "longctx-1m-2gpu.yaml"


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops have returned that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage):
        key = storage._cdata  # the C++ storage: views and in-place results share it
        if key in self.tracked:
            return
        self.tracked.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes


class _StubOp(torch.autograd.Function):
    """o = v * exp(g): per token, saving q, k, v, g, lambda as the real op does, with gradients of
    the same shapes and dtypes for all of them."""

    @staticmethod
    def forward(ctx, q, k, v, g, lam):
        ctx.save_for_backward(q, k, v, g, lam)
        return v * g.exp().unsqueeze(-1).to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, lam = ctx.saved_tensors
        e = g.exp()
        dv = do * e.unsqueeze(-1).to(do.dtype)
        dg = torch.einsum("bthv,bthv->bth", do, v).float() * e  # no [T, H, V] temporaries of its own
        return torch.zeros_like(q), torch.zeros_like(k), dv, dg, torch.zeros_like(lam)


def stub_op(q, k, v, g, level_scales, **_):
    return _StubOp.apply(q, k, v, g, level_scales), None


def build(args, device):
    cfg = load_recipe(RECIPE).model.model_copy(update={
        "n_layers": args.layers, "vocab_size": args.vocab, "backend": "triton" if device.type == "cuda" else "torch"})
    model = CausalLM(cfg).to(device)
    model.activation_checkpointing = True
    if args.token_tile:
        model.token_tile = args.token_tile
    model.offload_checkpoints = args.offload
    return model


def step(model, T, device, loss_tile):
    ids = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        total, count = token_nll(model, model(ids), ids, loss_tile)
    (total / count).backward()


def measure(model, T, device, loss_tile) -> tuple[int, float]:
    """(peak bytes above what was allocated before the step (gradients cleared), step seconds).
    The seconds on cpu include the counting's own overhead."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(model, T, device, loss_tile)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - start
    with LiveBytes() as counter:
        step(model, T, device, loss_tile)
    return counter.peak, time.perf_counter() - start


def drop_gradients(model):
    """Free each parameter's gradient as soon as it is accumulated (cpu only). At small T the
    gradients, which grow as backward reaches the early layers, would move the peak there, where
    most residual checkpoints are already freed; without them the peak is at the last layer, as it
    is at 512K tokens, and the per-token slope counts every layer's checkpoint."""
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", default="4096,8192,16384", help="tokens per step (one sequence)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--op", choices=["stub", "real"], default=None, help="default: stub on cpu, real on cuda")
    parser.add_argument("--token-tile", type=int, default=0, help="the model's token tile (0: its default)")
    parser.add_argument("--loss-tile", type=int, default=16384)
    parser.add_argument("--offload", action="store_true", help="model.offload_checkpoints (no effect on cpu)")
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before / after)")
    args = parser.parse_args()
    device = torch.device(args.device)
    op = args.op or ("real" if device.type == "cuda" else "stub")
    if op == "stub":
        ctxpar.models.mixers.log_linear_mamba2 = stub_op
    torch.manual_seed(0)
    model = build(args, device)
    if device.type == "cpu":
        drop_gradients(model)
    lengths = [int(t) for t in args.tokens.split(",")]
    if device.type == "cuda":
        measure(model, lengths[0], device, args.loss_tile)  # Triton compiles outside the figures
    rows, d = [], model.cfg.d_model
    print(f"{'T':>8} {'step s':>7} {'peak MiB':>10} {'peak KB/tok':>12} {'slope KB/tok':>13} {'24-layer slope':>15}")
    for T in lengths:
        peak, seconds = measure(model, T, device, args.loss_tile)
        row = {"T": T, "step_s": seconds, "peak_bytes": peak, "peak_per_token": peak / T}
        if rows:
            row["slope_per_token"] = (peak - rows[-1]["peak_bytes"]) / (T - rows[-1]["T"])
            row["slope_per_token_24_layers"] = row["slope_per_token"] + (24 - args.layers) * 4 * d
        rows.append(row)
        slope = f"{row['slope_per_token'] / 1e3:13.1f} {row['slope_per_token_24_layers'] / 1e3:15.1f}" if "slope_per_token" in row else ""
        print(f"{T:8d} {seconds:7.2f} {peak / 2**20:10.1f} {peak / T / 1e3:12.1f} {slope}", flush=True)
    result = {"label": args.label, "device": str(device), "op": op, "layers": args.layers, "vocab": args.vocab,
              "token_tile": getattr(model, "token_tile", None), "loss_tile": args.loss_tile, "offload": args.offload,
              "counting": "cuda max_memory_allocated" if device.type == "cuda" else "live storage bytes (dispatch mode)",
              "torch": torch.__version__, "rows": rows}
    out = _out_path(device, args.label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def _out_path(device, label) -> Path:
    name = f"{datetime.date.today()}-{device.type}-mem_train{'-' + label if label else ''}.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "benchmarks" / "results" / name


if __name__ == "__main__":
    main()
