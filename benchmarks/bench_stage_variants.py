"""ctxpar's Mamba-2 kernel stages beside edited copies of them, in one run: the A/B of a kernel change.

A variant is a copy of one stage module (ctxpar/kernels/triton/chunk_state.py, output.py,
node_grad.py, query_grad.py or source_grad.py) with the change made, saved anywhere; its stage is
the entry function it defines (chunk_states, outputs, node_grads, query_grads, source_grads). For
each T, on the benchmark shape of bench_ops.py (bf16, H = 32, K = 128, Hk = 1, V = 64): the stage
and each variant on the same inputs, their largest relative difference over every output (a
variant that computes something else shows here), the median time of each, and the whole op's
forward + backward with the variant in place of the stage. Without a GPU (TRITON_INTERPRET=1)
only the outputs are compared, on a small float32 shape (H = 2, K = V = 16, one sequence).

    python benchmarks/bench_stage_variants.py /tmp/query_grad_no_atomics.py /tmp/source_grad_x.py
    TS=4096,8192,131072 python benchmarks/bench_stage_variants.py variant.py   # writes $OUT/bench_stage_variants.json
"""

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import torch

import bench_ops as B
from ctxpar.kernels.triton import function as F

GPU = torch.cuda.is_available()
PREC = "tf32" if GPU else "ieee"
if not GPU:  # the interpreter: a small float32 shape, one sequence
    B.DEV, B.DT, B.H, B.K, B.V = "cpu", torch.float32, 2, 16, 16
# each stage's call on the prepared inputs s, returning every tensor it writes
CALLS = {
    "chunk_states": lambda f, s: [x for x in f(s.k, s.v, s.g, s.layout, PREC, copy=s.copy is not None)
                                  if x is not None],
    "outputs": lambda f, s: [f(s.q, s.k, s.v, s.g, s.lam, s.nodes, None, s.gc, s.layout, PREC)],
    "node_grads": lambda f, s: f(s.q, s.do, s.g, s.lam, s.gc, s.grads, None, s.layout, PREC) or [s.grads],
    "query_grads": lambda f, s: f(s.q, s.k, s.v, s.g, s.lam, s.do, s.nodes, None, s.gc, s.layout, PREC),
    "source_grads": lambda f, s: [*f(s.q, s.k, s.v, s.g, s.lam, s.do, s.grads, s.nodes, s.gc, s.straddle, s.dlam,
                                     s.dg, s.layout, PREC), s.dlam, s.dg],
}


def load_variant(path):
    spec = importlib.util.spec_from_file_location(f"variant_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stages = [name for name in CALLS if hasattr(module, name)]
    if len(stages) != 1:
        raise SystemExit(f"{path}: defines {stages or 'none'} of the stage entries {list(CALLS)}; expected one")
    return stages[0], getattr(module, stages[0])


def prepared(T):
    """The stages' inputs at T (bench_ops.py's shape and values; a small one on the interpreter)."""
    s = B.stage_inputs(T, B.batch_of(T) if GPU else 1, PREC)
    s.inputs = (s.q, s.k, s.v, s.g, s.lam)
    return s


def outputs_of(stage, fn, s):
    """The stage's outputs on fresh copies of the buffers it writes in place."""
    fresh = SimpleNamespace(**{**vars(s), **{n: getattr(s, n).clone() for n in ("grads", "dlam", "dg")}})
    return [x.float() for x in CALLS[stage](fn, fresh)]


def largest_difference(a, b):
    return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


def op_ms(s, T):
    """Forward + backward of the whole op (current stages, or one swapped for a variant)."""
    leaves = [x.detach().reshape(s.B, T, *x.shape[1:]).requires_grad_() for x in s.inputs]
    return B.median_ms(B.fwd_bwd_step(B.ctxpar_call, leaves, s.do.reshape(s.B, T, *s.do.shape[1:])), rep=40)


def compare(variants, T):
    s = prepared(T)
    ms = lambda fn: B.median_ms(fn, rep=40)  # noqa: E731
    rows = []
    base_op = op_ms(s, T) if GPU else None
    for path, (stage, fn) in variants.items():
        current = getattr(F, stage)
        row = dict(variant=path, stage=stage, T=T, B=s.B,
                   rel_diff=largest_difference(outputs_of(stage, fn, s), outputs_of(stage, current, s)))
        if GPU:
            row.update(stage_ms=ms(lambda: CALLS[stage](current, s)), variant_ms=ms(lambda: CALLS[stage](fn, s)),
                       op_ms=base_op)
            setattr(F, stage, fn)  # function.py calls the stages through its own names
            try:
                row["variant_op_ms"] = op_ms(s, T)
            finally:
                setattr(F, stage, current)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    variants = {path: load_variant(path) for path in sys.argv[1:]}
    if not variants:
        raise SystemExit(__doc__)
    ts = [int(t) for t in os.environ.get("TS", "8192,131072" if GPU else "320").split(",")]
    rows = [row for T in ts for row in compare(variants, T)]
    with open(os.path.join(os.environ.get("OUT", "."), "bench_stage_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n%-40s %-13s %8s %9s %8s %9s %9s %9s" % ("variant", "stage", "T", "rel_diff", "ms", "variant", "op_ms",
                                                      "with it"))
    for r in rows:
        times = (r.get("stage_ms"), r.get("variant_ms"), r.get("op_ms"), r.get("variant_op_ms"))
        print("%-40s %-13s %8d %9.2e " % (os.path.basename(r["variant"])[:40], r["stage"], r["T"], r["rel_diff"])
              + " ".join("%8.3f" % t if t is not None else "%8s" % "-" for t in times))


if __name__ == "__main__":
    main()
