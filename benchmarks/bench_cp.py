"""Context-parallel log-linear attention on N GPUs (NCCL), side by side with flash-linear-attention's
context-parallel Gated DeltaNet, in the same processes and the same run (as
/work/shared/anchors/bench_cp.py measures the anchor).

    torchrun --nproc_per_node 2 benchmarks/bench_cp.py --gpus 2      # writes $OUT/bench_cp.json
    torchrun --nproc_per_node 2 benchmarks/bench_cp.py --device cpu --strong-t 2048 --weak-t 1024  # smoke test

For each variant (log-linear GDN: H=16, K=V=128; log-linear Mamba-2: H=32, K=128 shared, V=64;
bf16, B=1), first a check: every rank draws the same inputs and rank 0 compares the CP op's
output and gradients with one device on the whole sequence (--check-t tokens, default the first
--strong-t; bf16 tolerances). Then, for each variant and each exchange scheme:
  * strong scaling: T = --strong-t total (128K and 1M) split over the GPUs, against one GPU on all of it;
  * weak scaling: --weak-t tokens per GPU (512K), against one GPU on one share;
each row: forward+backward ms, bytes each rank sends (forward and backward, the largest rank),
exposed communication (the CP step minus the same step over a transport that moves nothing, so
compute is identical), speedup and efficiency. The anchor rows time FLA's chunk_gated_delta_rule
with its cp_context on the same shapes. A failing row is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench_ops import fresh_grads
from ctxpar.comm.collectives import comm_stats, reset_comm_stats
from ctxpar.cp import SCHEMES, CPContext
from ctxpar.kernels import log_linear_gdn, log_linear_mamba2, num_levels

SHAPES = {"gdn": dict(H=16, Hk=16, K=128, V=128), "mamba2": dict(H=32, Hk=1, K=128, V=64)}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="GPUs to split over (default: the world size)")
    p.add_argument("--strong-t", default="131072,1048576", help="total tokens, comma-separated")
    p.add_argument("--weak-t", type=int, default=524288, help="tokens per GPU")
    p.add_argument("--variants", default="gdn,mamba2")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-anchor", action="store_true", help="skip flash-linear-attention's rows")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--check-t", type=int, default=None,
                   help="first check the CP op against one device at this many tokens (default: the first "
                        "--strong-t; 0: no check)")
    return p.parse_args()


class Timer:
    """Median milliseconds of fn over steps, after warm-up; CUDA events on the GPU. When every rank
    runs fn (``barrier``), the slowest rank's median: a step ends when its last rank does."""

    def __init__(self, device, steps, group, warmup=2):
        self.cuda, self.steps, self.group, self.warmup = device.type == "cuda", steps, group, warmup

    def __call__(self, fn, barrier=True):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.steps):
            self._sync(barrier)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        median = sorted(times)[len(times) // 2]
        return max_over_ranks(median, self.group) if barrier else median

    def _sync(self, barrier):
        if self.cuda:
            torch.cuda.synchronize()
        if barrier:
            dist.barrier(group=self.group)


class NullTransport:
    """Moves nothing: every rank gets its own message back (or zeros of the expected shape), so a
    step over it does the CP step's compute without its communication."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def start_all_gather(self, x):
        class Done:
            def wait(self_inner):
                return x.expand(self.size, *x.shape)

        return Done()

    def exchange(self, send, recv_shapes):
        (x,) = send.values()
        return {p: x.new_zeros(shape) + 0 * x.sum() for p, (shape, _) in recv_shapes.items()}

    def bytes_sent(self):
        return 0


def make_inputs(variant, T, device, seed, shape=None):
    s = shape or SHAPES[variant]
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
    q, k = rand(1, T, s["Hk"], s["K"]), rand(1, T, s["Hk"], s["K"])
    if variant == "gdn":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = rand(1, T, s["H"], s["V"])
    g = F.logsigmoid(rand(1, T, s["H"]) + 4)  # mild decay: float32, <= 0
    beta = torch.rand(1, T, s["H"], device=device, generator=gen) if variant == "gdn" else None
    return q, k, v, g, beta


def leaves_of(q, k, v, g, beta, lam):
    """The op's inputs as leaves requiring grad: bf16, g float32 (beta only for GDN)."""
    bf16 = lambda x: x.to(torch.bfloat16).requires_grad_()  # noqa: E731
    gdn = [] if beta is None else [bf16(beta)]
    return [bf16(q), bf16(k), bf16(v), g.clone().requires_grad_()] + gdn + [bf16(lam)]


def call_op(variant, leaves, backend, cp):
    op = log_linear_gdn if variant == "gdn" else log_linear_mamba2
    return op(*leaves, cp=cp, backend=backend)[0]


def step_fn(variant, inputs, levels, backend, cp):
    """One forward+backward of the op on these inputs (bf16 leaves requiring grad)."""
    q, k, v, g, beta = inputs
    leaves = leaves_of(q, k, v, g, beta, torch.ones(*v.shape[:3], levels, device=v.device))
    do = torch.randn_like(leaves[2])

    def run():
        fresh_grads(leaves)
        call_op(variant, leaves, backend, cp).backward(do)

    return run


def fla_step_fn(inputs, cp_context):
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, as the anchors: FLA refuses gated bwd on Hopper < 3.7.1

    q, k, v, g, beta = inputs
    q, k, v, beta = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v, beta))
    g = g.clone().requires_grad_()
    do = torch.randn_like(v)

    def run():
        fresh_grads([q, k, v, g, beta])
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cp_context=cp_context)
        o.backward(do)

    return run


def max_over_ranks(x, group):
    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def ctxpar_rows(args, variant, scheme, mode, T, group, timer, device, baseline):
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    n = T // P
    levels = num_levels(T)
    mine = make_inputs(variant, n, device, seed=rank)  # timing only: each rank draws just its slice
    row = dict(impl="ctxpar", variant=variant, scheme=scheme, mode=mode, T=T, P=P, T_per_gpu=n)
    cp = CPContext(group, scheme=scheme)
    run = step_fn(variant, mine, levels, args.backend, cp)
    run()
    reset_comm_stats()
    run()
    row["bytes_per_rank"] = int(max_over_ranks(comm_stats(group), group))
    row["host_syncs"] = host_syncs(run)
    row["ms"] = timer(run)
    null = CPContext.from_transport(NullTransport(rank, P), scheme=scheme)
    row["compute_only_ms"] = timer(step_fn(variant, mine, levels, args.backend, null))
    row["exposed_comm_ms"] = max(0.0, row["ms"] - row["compute_only_ms"])
    return _scaled(row, baseline)


def host_syncs(fn) -> list[str]:
    """Where one step makes the host wait for the GPU (torch's sync debug mode): each distinct
    site, as file:line of the innermost frame outside torch (torch's own warning names the line in
    torch that synchronized), then that line in torch. The op should have none; the CPU has
    nothing to report."""
    if not torch.cuda.is_available():
        return []
    sites = set()
    running = [False]  # only fn's syncs: on an H200, switching the mode on warned once by itself

    def record(message, category, filename, lineno, file=None, line=None):
        if running[0] and "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1]
                    if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != warnings.__file__]
            caller = f"{os.path.relpath(ours[-1].filename)}:{ours[-1].lineno} -> " if ours else ""
            sites.add(f"{caller}{os.path.relpath(filename)}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        running[0] = True
        try:
            fn()
        finally:
            running[0] = False
            torch.cuda.set_sync_debug_mode("default")
    return sorted(sites)


def _scaled(row, baseline):
    """Speedup and efficiency against the one-GPU baseline (rank 0's time, broadcast)."""
    if baseline is not None:
        row["one_gpu_ms"] = baseline
        if row["mode"] == "strong":
            row["speedup"] = baseline / row["ms"]
            row["efficiency"] = row["speedup"] / row["P"]
        else:
            row["efficiency"] = baseline / row["ms"]
    return row


def one_gpu_ms(make_run, timer, group):
    """Time make_run() on rank 0 alone (the others wait), shared with every rank; None if it fails
    (rank 0 must still reach the collective below, or the others would hang)."""
    ms = 0.0
    if dist.get_rank(group) == 0:
        try:
            ms = timer(make_run(), barrier=False)
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(one_gpu_error=repr(e)[:300])), flush=True)
    return max_over_ranks(ms, group) or None


def fla_rows(args, mode, T, group, timer, device):
    from fla.ops.cp import build_cp_context

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    n = T // P
    mine = make_inputs("gdn", n, device, seed=rank)
    ctx = build_cp_context(torch.tensor([0, T], device=device, dtype=torch.long), group=group)
    row = dict(impl="fla", variant="gdn_linear", scheme="fla_cp", mode=mode, T=T, P=P, T_per_gpu=n)
    row["ms"] = timer(fla_step_fn(mine, ctx))
    del mine
    baseline = one_gpu_ms(lambda: fla_step_fn(make_inputs("gdn", T if mode == "strong" else n, device, 0), None),
                          timer, group)
    return _scaled(row, baseline)


def check_row(args, variant, T, group, device):
    """The CP op's output and gradients at T total tokens against one GPU on the whole sequence
    (the same draws on every rank, each takes its slice): relative errors, bf16 tolerances."""
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    whole = make_inputs(variant, T, device, seed=0)
    gen = torch.Generator(device).manual_seed(1)
    lam = 0.5 + torch.rand(1, T, SHAPES[variant]["H"], num_levels(T), device=device, generator=gen)
    do = torch.randn(1, T, SHAPES[variant]["H"], SHAPES[variant]["V"], device=device, generator=gen)
    whole = (*whole, lam, do)
    n = T // P
    mine = tuple(None if x is None else x[:, rank * n : (rank + 1) * n] for x in whole)
    got = [_gather(x, group) for x in _fwd_bwd(variant, mine, args.backend, CPContext(group))]
    row = dict(impl="ctxpar", variant=variant, scheme="allgather", mode="check", T=T, P=P)
    if rank == 0:
        want = _fwd_bwd(variant, whole, args.backend, None)
        names = ["o", "q", "k", "v", "g"] + (["beta"] if variant == "gdn" else []) + ["level_scales"]
        row["rel_err"] = {name: _rel(a, b) for name, a, b in zip(names, got, want)}
        row["ok"] = all(e <= (4e-3 if name == "o" else 1e-2) for name, e in row["rel_err"].items())
    return row


def _fwd_bwd(variant, inputs, backend, cp):
    """[o, dq, dk, dv, dg, (dbeta,) dlam] of one bf16 forward+backward."""
    *args, do = inputs
    leaves = leaves_of(*args)
    o = call_op(variant, leaves, backend, cp)
    o.backward(do.to(o.dtype))
    return [o.detach()] + [x.grad for x in leaves]


def _gather(x, group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def guarded(rows, fn, *a, label):
    try:
        rows.append(fn(*a))
    except Exception as e:  # noqa: BLE001  a failing row is recorded, not fatal
        rows.append(dict(label, error=repr(e)[:300]))
    print(json.dumps(rows[-1]), flush=True) if dist.get_rank() == 0 else None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    args = parse()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    gpus = args.gpus or world
    if gpus > world:
        raise SystemExit(f"--gpus {gpus} but only {world} processes: torchrun --nproc_per_node {gpus}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.new_group(list(range(gpus)))
    rows = []
    if rank < gpus:
        timer = Timer(device, args.steps, group, args.warmup)
        check_t = int(args.strong_t.split(",")[0]) if args.check_t is None else args.check_t
        if check_t:
            for variant in args.variants.split(","):
                guarded(rows, check_row, args, variant, check_t, group, device,
                        label=dict(impl="ctxpar", variant=variant, mode="check", T=check_t))
        cases = [("strong", int(t)) for t in args.strong_t.split(",")] + [("weak", args.weak_t * gpus)]
        for mode, T in cases:
            n = T // gpus
            for variant in args.variants.split(","):
                whole = make_inputs(variant, T if mode == "strong" else n, device, 0)
                levels = num_levels(T)
                label = dict(impl="ctxpar", variant=variant, mode=mode, T=T, P=gpus)
                baseline = one_gpu_ms(lambda: step_fn(variant, whole, levels, args.backend, None), timer, group)
                del whole
                for scheme in args.schemes.split(","):
                    guarded(rows, ctxpar_rows, args, variant, scheme, mode, T, group, timer, device, baseline,
                            label=dict(label, scheme=scheme))
            if device.type == "cuda" and not args.no_anchor:
                guarded(rows, fla_rows, args, mode, T, group, timer, device, label=dict(impl="fla", mode=mode, T=T))
    if rank == 0:
        _table(rows)
        with open(os.path.join(os.environ.get("OUT", "."), "bench_cp.json"), "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def _table(rows):
    cols = ("impl", "variant", "scheme", "mode", "T", "P", "ms", "one_gpu_ms", "efficiency", "exposed_comm_ms",
            "bytes_per_rank", "ok")
    print(" | ".join(cols))
    for r in rows:
        cells = [r.get(c, r.get("error", "") if c == "ms" else "") for c in cols]
        print(" | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells))


if __name__ == "__main__":
    main()
