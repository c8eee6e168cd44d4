"""Sweep the launch constants of ctxpar's GDN Triton kernels in one run, without a branch per value.

A setting is module.NAME=v1,v2,... with module one of ctxpar.kernels.triton's (gdn_carry.NODE_TILE,
gdn_chunk_grad.TILE, gdn_chunk_grad.PAIRS_WARPS, gdn_tree.STEP, ...): a module-level constant the
op reads when it launches - not one inside a kernel, nor a default argument (DEFAULT_CHUNK), which
were bound at import and would not change. Each value runs alone, the others at their defaults;
settings joined by + run together, one value each. For every shape and T, on bench_ops.py's GDN
inputs (bf16): the defaults, then each value, on the same inputs: the op's forward+backward median
ms and the largest relative difference of its output and gradients from the defaults' (tiling moves
bf16 rounding a little; a value that computes something else shows as a large one).

    python benchmarks/sweep_gdn.py gdn_chunk_grad.PAIRS_WARPS=8 gdn_carry.WIDE_CHAIN_STAGES=1
    python benchmarks/sweep_gdn.py gdn_chunk_grad.TILE_STAGES=2+gdn_chunk.CHUNK_STAGES=2   # both at once
    SHAPES=16x128x128,6x192x384 GDN_TS=8192,131072 python benchmarks/sweep_gdn.py gdn_tree.STEP=64

Writes $OUT/sweep_gdn.json after every row and prints a table last. Without a GPU
(TRITON_INTERPRET=1) it only compares, on a small float32 shape.
"""

import ast
import importlib
import json
import os
import sys

import torch

import bench_ops as B

GPU = torch.cuda.is_available()
if not GPU:  # the interpreter: a small float32 shape, one sequence
    B.DEV, B.DT = "cpu", torch.float32


def setting(text):
    """'module.NAME=v1,v2' -> (module, NAME, [v1, v2]); the constant must exist."""
    target, values = text.split("=", 1)
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(f"ctxpar.kernels.triton.{module_name}")
    if not hasattr(module, name):
        raise SystemExit(f"{module.__name__} has no {name}")
    return module, name, [ast.literal_eval(v) for v in values.split(",")]


def parse(arg):
    """An argument -> its cases, each a list of (module, NAME, value) set together: 'module.NAME=v1,v2'
    one case a value, 'a.X=1+b.Y=2' one case with both (values found one at a time can interact)."""
    parts = [setting(text) for text in arg.split("+")]
    if len(parts) == 1:
        module, name, values = parts[0]
        return [[(module, name, v)] for v in values]
    if any(len(values) > 1 for *_, values in parts):
        raise SystemExit(f"{arg}: a combination takes one value a constant")
    return [[(module, name, values[0]) for module, name, values in parts]]


def label(case):
    return "+".join(f"{module.__name__.rsplit('.', 1)[1]}.{name}={value}" for module, name, value in case)


def step(inputs, do):
    """The op's output and every input gradient of one forward+backward."""
    B.fresh_grads(inputs)
    o = B.ctxpar_gdn_call("triton")(*inputs)
    o.backward(do)
    return [o.detach().float()] + [x.grad.float() for x in inputs]


def largest_difference(ours, reference):
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(ours, reference))


def measure(inputs, do, reference):
    """(largest relative difference from the reference, fwd+bwd median ms or None off the GPU)."""
    from ctxpar.kernels.triton import gdn_function

    gdn_function._tables.cache_clear()  # a constant may shape the cached layout (READ_RUN)
    diff = largest_difference(step(inputs, do), reference) if reference else 0.0
    ms = B.median_ms(B.fwd_bwd_step(B.ctxpar_gdn_call("triton"), inputs, do), warmup=10, rep=100) if GPU else None
    return diff, ms


def sweep(settings, shape, T, rows, out):
    heads, k_dim, v_dim = shape
    batch = B.batch_of(T) if GPU else 1
    inputs = B.gdn_inputs(heads, k_dim, v_dim, True)(batch, T)
    do = torch.randn(batch, T, heads, v_dim, device=B.DEV, dtype=B.DT)
    reference = step(inputs, do)
    for case in [[]] + [case for cases in settings for case in cases]:
        defaults = [(module, name, getattr(module, name)) for module, name, _ in case]
        row = dict(shape=f"h{heads}_k{k_dim}_v{v_dim}", T=T, B=batch, setting=label(case) or "defaults")
        try:
            for module, name, value in case:
                setattr(module, name, value)
            row["max_rel_diff"], row["fwdbwd_ms"] = measure(inputs, do, reference if case else None)
        except Exception as e:  # one failing value (a shared-memory overflow, say) must not stop the rest
            row["error"] = repr(e)[:300]
        finally:
            for module, name, value in defaults:
                setattr(module, name, value)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(out, "sweep_gdn.json"), "w") as f:  # survives a timeout
            json.dump(rows, f, indent=1)


def main():
    settings = [parse(a) for a in sys.argv[1:]]
    shapes = [tuple(map(int, s.split("x"))) for s in os.environ.get("SHAPES", "16x128x128").split(",")]
    ts = [int(t) for t in os.environ.get("GDN_TS", "8192,131072").split(",")]
    if not GPU:
        shapes, ts = [(2, 32, 32)], [640]  # ten chunks of 64: a tree of four heights
    rows, out = [], os.environ.get("OUT", ".")
    for shape in shapes:
        for T in ts:
            sweep(settings, shape, T, rows, out)
    print(f"\n{'shape':18s} {'T':>7s} {'setting':40s} {'ms':>8s} {'max rel diff':>12s}")
    for r in rows:
        ms = "-" if r.get("fwdbwd_ms") is None else f"{r['fwdbwd_ms']:.2f}"
        tail = r["error"][:60] if "error" in r else f"{ms:>8} {r['max_rel_diff']:12.2e}"
        print(f"{r['shape']:18s} {r['T']:7d} {r['setting']:40s} {tail}")


if __name__ == "__main__":
    main()
