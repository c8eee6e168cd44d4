"""The CP state reads (ctxpar.kernels.state_reads.add_state_reads, the Triton kernels on a GPU)
against the number of buckets the arriving state holds: what a rank at offset t0 pays is set by
popcount(t0), so this is the figure the performance model needs past two GPUs.

    python benchmarks/bench_state_reads.py                       # n = 512K, 1 2 4 10 buckets
    python benchmarks/bench_state_reads.py --n 131072 --buckets 1,3

Shape: bench_cp's Mamba-2 (H = 32, K = 128 with Hk = 1, V = 64, bf16 queries and o, float32 weights
and state). Each row: forward and forward+backward median ms (triton.testing.do_bench), checked
first against ``torch_reads`` in float64 on its first 64K tokens (relative error of the output and of the gradients of
q, w and the state). Writes $OUT/bench_state_reads.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from ctxpar.kernels.state_reads import add_state_reads, torch_reads

H, HQ, K, V = 32, 1, 128, 64


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=524288, help="tokens that read the state")
    p.add_argument("--buckets", default="1,2,4,10", help="buckets in the state, comma-separated")
    return p.parse_args()


def inputs(n, nb, device):
    o = torch.randn(1, n, H, V, device=device).bfloat16()
    q = torch.randn(1, n, HQ, K, device=device).bfloat16()
    w = torch.rand(1, n, H, nb, device=device)
    s = torch.randn(1, H, nb, K, V, device=device) * K**-0.5
    return [x.requires_grad_() for x in (o, q, w, s)]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def check(leaves, do, rows=65536):
    """Relative errors of the kernels' output and gradients against the float64 reference, on the
    first ``rows`` tokens (the float64 reference of 512K tokens and 10 buckets would take tens of GiB)."""
    *tokens, state = leaves  # o, q, w are token-major; the state is whole
    leaves = [x.detach()[:, :rows].requires_grad_() for x in tokens] + [state]
    do = do[:, :rows]
    out = add_state_reads(*leaves)
    grads = torch.autograd.grad(out, leaves[1:], do)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    want = exact[0] + torch_reads(*exact[1:])
    want_grads = torch.autograd.grad(want, exact[1:], do.double())
    names = ("out", "q", "w", "state")
    return {name: rel(a, b) for name, a, b in zip(names, [out, *grads], [want, *want_grads])}


def main():
    args = parse()
    device = torch.device("cuda")
    rows = []
    for nb in (int(x) for x in args.buckets.split(",")):
        leaves = inputs(args.n, nb, device)
        do = torch.randn_like(leaves[0])
        errors = check(leaves, do)
        with torch.no_grad():
            fwd = do_bench(lambda: add_state_reads(*leaves), warmup=5, rep=100, return_mode="median")
        fwd_bwd = do_bench(lambda: torch.autograd.grad(add_state_reads(*leaves), leaves, do), warmup=5, rep=100,
                           return_mode="median")
        rows.append(dict(n=args.n, buckets=nb, H=H, K=K, V=V, fwd_ms=fwd, fwdbwd_ms=fwd_bwd, rel_err=errors))
        print(json.dumps(rows[-1]), flush=True)
        del leaves, do
    with open(os.path.join(os.environ.get("OUT", "."), "bench_state_reads.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("n | buckets | fwd ms | fwd+bwd ms | max rel err")
    for r in rows:
        worst = max(r["rel_err"].values())
        print(f"{r['n']} | {r['buckets']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {worst:.1e}")


if __name__ == "__main__":
    main()
