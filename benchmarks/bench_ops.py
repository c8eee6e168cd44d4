"""ctxpar's Triton log-linear Mamba-2 and Gated DeltaNet side by side with the anchors, on one GPU.

Shape: H = 32, K = 128 shared by all heads (Hk = 1), V = 64, bf16, g float32; T in 4K (B = 8),
8K (B = 4), 32K, 128K, 512K, 1M (B = 1). Anchors as /work/shared/anchors/bench_kernels.py times
them: flash-linear-attention's chunk_log_linear_attn (it caps T at 128K) and chunk_simple_gla
(per-head q/k), and PyTorch SDPA causal softmax, flash and cuDNN (H = 32, D = 64, up to 128K).
Each row: forward and forward+backward median time (triton.testing.do_bench), tokens per second
of forward+backward, peak memory of one forward+backward. A failing row is recorded, not fatal.

Gated DeltaNet rows: ctxpar's log-linear GDN (Triton and torch backends) and flash-linear-attention's
chunk_gated_delta_rule (plain GDN, the anchor of DESIGN.md section 5) at (H, K, V) = (16, 128, 128)
and (6, 192, 384), per-head q/k, T in GDN_TS (default 8K with B = 4, 32K, 128K, 512K).

    python benchmarks/bench_ops.py        # writes $OUT/bench_ops.json and $OUT/bench_ops.png
    TS=8192,131072 ONLY=ctxpar python benchmarks/bench_ops.py
    STAGES=8192,131072 python benchmarks/bench_ops.py   # also each kernel stage of ctxpar alone
    GDN_STAGES=8192,131072 python benchmarks/bench_ops.py   # the same for ctxpar's GDN (H=16, K=V=128)
    BUDGET_S=150 python benchmarks/bench_ops.py   # rows that would start later are skipped, the table still prints
    ONLY=ctxpar_triton_gdn,ctxpar_torch_gdn,fla_gated_delta_rule python benchmarks/bench_ops.py   # the GDN rows alone
"""

import functools
import json
import os
import time

import torch
import triton

from ctxpar.kernels.levels import num_levels

DT = torch.bfloat16
DEV = "cuda"
H, K, V = 32, 128, 64
DEFAULT_TS = "4096,8192,32768,131072,524288,1048576"
GDN_SHAPES = [(16, 128, 128), (6, 192, 384)]  # (H, K, V)
GDN_TS = "8192,32768,131072,524288"
ONLY = [x for x in os.environ.get("ONLY", "").split(",") if x]
BUDGET_S = float(os.environ.get("BUDGET_S", "inf"))
START = time.monotonic()
results = []


def over_budget():
    return time.monotonic() - START > BUDGET_S


def batch_of(T):
    return max(1, 32768 // T)


def median_ms(fn, warmup=5, rep=50):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fresh_grads(inputs):
    """As a training step after zero_grad(set_to_none=True): backward then assigns each leaf's
    gradient instead of adding it to the last run's, an add per leaf that would be timed too
    (0.13 ms of a 4.1 ms step at 8K x 4 on an H200, about 2 ms at 512K tokens)."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.grad = None


def fwd_bwd_step(call, inputs, do):
    """One forward + backward on fresh gradients."""

    def step():
        fresh_grads(inputs)
        call(*inputs).backward(do)

    return step


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def run_case(name, T, make, call, heads=H):
    if ONLY and not any(name.startswith(o) for o in ONLY):
        return
    B = batch_of(T)
    row = dict(name=name, T=T, B=B, H=heads)
    started = time.monotonic()
    if over_budget():
        row["error"] = "skipped: BUDGET_S spent"
        results.append(row)
        return
    try:
        torch.cuda.empty_cache()
        inputs = make(B, T)
        with torch.no_grad():  # an output kept with its graph would hold the op's saved tensors through every run
            do = torch.randn_like(call(*inputs))

        fwd_bwd = fwd_bwd_step(call, inputs, do)
        fwd_bwd()
        with torch.no_grad():
            fwd = median_ms(functools.partial(call, *inputs), warmup=10, rep=100)
        fb = median_ms(fwd_bwd, warmup=10, rep=100)
        row.update(fwd_ms=fwd, fwdbwd_ms=fb, fwdbwd_Mtok_s=B * T / fb / 1e3, fwd_Mtok_s=B * T / fwd / 1e3,
                   peak_GiB=peak_gib(fwd_bwd))
        del inputs, do
    except Exception as e:  # one failing row must not stop the others
        row["error"] = repr(e)[:300]
    row["wall_s"] = time.monotonic() - started  # compiles and autotuning included
    results.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "bench_ops.json"), "w") as f:  # survives a timeout
        json.dump(results, f, indent=1)


def mamba2_inputs(B, T, heads_qk):
    q = torch.randn(B, T, heads_qk, K, device=DEV, dtype=DT).requires_grad_()
    k = torch.randn(B, T, heads_qk, K, device=DEV, dtype=DT).requires_grad_()
    v = (torch.randn(B, T, H, V, device=DEV, dtype=DT) * 0.1).requires_grad_()
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, device=DEV) - 4)
    g = (-torch.exp(torch.rand(H, device=DEV)) * dt).requires_grad_()
    return q, k, v, g


def log_linear_inputs(B, T):
    q, k, v, g = mamba2_inputs(B, T, 1)
    lam = torch.randn(B, T, H, num_levels(T), device=DEV, dtype=DT).requires_grad_()
    return q, k, v, g, lam


def ctxpar_call(q, k, v, g, lam):
    from ctxpar.kernels.triton import chunked

    B, T = q.shape[:2]
    return chunked(q, k, v, g, None, lam, [(b, 0, T) for b in range(B)])[0]


def gdn_inputs(heads, k_dim, v_dim, log_linear):
    """(B, T) -> q, k (unit rows, as the op's users normalise them), v, g, beta[, lam]."""
    def make(B, T):
        q = torch.randn(B, T, heads, k_dim, device=DEV, dtype=DT)
        k = torch.nn.functional.normalize(torch.randn(B, T, heads, k_dim, device=DEV), dim=-1).to(DT)
        v = torch.randn(B, T, heads, v_dim, device=DEV, dtype=DT) * 0.1
        dt = torch.nn.functional.softplus(torch.randn(B, T, heads, device=DEV) - 4)
        g = -torch.exp(torch.rand(heads, device=DEV)) * dt
        beta = torch.rand(B, T, heads, device=DEV, dtype=DT)
        out = [q, k, v, g, beta]
        if log_linear:
            out.append(torch.rand(B, T, heads, num_levels(T), device=DEV, dtype=DT) + 0.5)
        return [x.requires_grad_() for x in out]

    return make


def ctxpar_gdn_call(backend):
    from ctxpar import log_linear_gdn

    return lambda q, k, v, g, beta, lam: log_linear_gdn(q, k, v, g, beta, lam, backend=backend)[0]  # the public op


def fla_gated_delta_rule():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        print("flash-linear-attention gated delta rule not importable:", e, flush=True)
        return None
    return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0]


def gdn_rows(ts, ctxpar_rows):
    """ctxpar's log-linear GDN rows (ctxpar_rows) or FLA's gated delta rule rows, every shape and T.
    ctxpar's torch backend runs beside its Triton one: "auto" picks between them for GDN."""
    fla = None if ctxpar_rows else fla_gated_delta_rule()
    for heads, k_dim, v_dim in GDN_SHAPES:
        for T in ts:
            tag = f"h{heads}_k{k_dim}_v{v_dim}"
            if ctxpar_rows:
                for backend in ("triton", "torch"):
                    run_case(f"ctxpar_{backend}_gdn_{tag}", T, gdn_inputs(heads, k_dim, v_dim, True),
                             ctxpar_gdn_call(backend), heads)
            elif fla is not None:
                run_case(f"fla_gated_delta_rule_{tag}", T, gdn_inputs(heads, k_dim, v_dim, False), fla, heads)


def sdpa_inputs(B, T):
    return [torch.randn(B, H, T, 64, device=DEV, dtype=DT).requires_grad_() for _ in range(3)]


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return call


def fla_ops():
    try:
        import fla.ops.common.chunk_o as chunk_o

        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, as the anchors: FLA refuses gated bwd on Hopper < 3.7.1
        from fla.ops.log_linear_attn import chunk_log_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        print("flash-linear-attention not importable:", e, flush=True)
        return None, None
    return (lambda q, k, v, g, lam: chunk_log_linear_attn(q, k, v, g, lam)[0],
            lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0])


def stage_inputs(T, B, prec="tf32"):
    """Every Mamba-2 stage's inputs at T x B (this script's shape and values): the up-swept tree,
    small random node gradients, and what the backward stages pass on (dlam, dg, xs, ys, straddle)."""
    from types import SimpleNamespace

    from ctxpar.kernels.triton import function as F
    from ctxpar.kernels.triton.layout import build_layout

    q, k, v, g, lam = (x.detach().reshape(B * T, *x.shape[2:]) for x in log_linear_inputs(B, T))
    do = torch.randn_like(v)
    spans = [(b, 0, T) for b in range(B)]
    layout = build_layout(spans, [0] * B, T, F.DEFAULT_CHUNK, F.DEFAULT_SEGMENT, DEV)
    states, copy, totals = F.chunk_states(k, v, g, layout, prec, copy=k.dtype == torch.bfloat16)
    gc = F.cumulative_decay(totals, layout)
    F.up_sweep(states, copy, None, gc, layout)
    nodes = states if copy is None else copy  # what the readers take, as in the op
    ys = torch.zeros(layout.num_slots, v.shape[1], layout.heights, device=DEV)
    _, dlam, dg, xs = F.query_grads(q, k, v, g, lam, do, nodes, None, gc, layout, prec)
    return SimpleNamespace(q=q, k=k, v=v, g=g, lam=lam, do=do, B=B, spans=spans, layout=layout, states=states,
                           copy=copy, nodes=nodes, totals=totals, gc=gc, grads=torch.randn_like(states) * 0.01, ys=ys,
                           xs=xs, dlam=dlam, dg=dg, straddle=F.straddle(xs, ys, layout))


def stage_times(T):
    """Median ms of each ctxpar stage alone (in-place stages rerun on their own output: same work)."""
    from ctxpar.kernels.triton import function as F
    from ctxpar.kernels.triton.layout import build_layout, clear_layout_cache

    B = batch_of(T)
    s = stage_inputs(T, B)
    ms = median_ms
    fwd = bwd = "tf32"
    times = {
        "layout (host, uncached)": ms(lambda: (clear_layout_cache(),
                                               build_layout(s.spans, [0] * B, T, F.DEFAULT_CHUNK, F.DEFAULT_SEGMENT,
                                                            DEV))),
        "chunk_state": ms(lambda: F.chunk_states(s.k, s.v, s.g, s.layout, fwd, copy=s.copy is not None)),
        "cumulative_decay": ms(lambda: F.cumulative_decay(s.totals, s.layout)),
        "tree up": ms(lambda: F.up_sweep(s.states, s.copy, None, s.gc, s.layout)),
        "output": ms(lambda: F.outputs(s.q, s.k, s.v, s.g, s.lam, s.nodes, None, s.gc, s.layout, fwd)),
        "node_grad": ms(lambda: F.node_grads(s.q, s.do, s.g, s.lam, s.gc, s.grads, None, s.layout, bwd)),
        "tree down": ms(lambda: F.down_sweep(s.grads, s.nodes, s.ys, s.gc, s.layout)),
        "query_grad": ms(lambda: F.query_grads(s.q, s.k, s.v, s.g, s.lam, s.do, s.nodes, None, s.gc, s.layout, bwd)),
        "dg straddle": ms(lambda: F.straddle(s.xs, s.ys, s.layout)),
        "source_grad": ms(lambda: F.source_grads(s.q, s.k, s.v, s.g, s.lam, s.do, s.grads, s.nodes, s.gc, s.straddle,
                                                 s.dlam, s.dg, s.layout, bwd)),
    }
    row = dict(name="ctxpar_stage_ms", T=T, B=B, H=H, stages=times)
    results.append(row)
    print(json.dumps(row), flush=True)


def gdn_stage_times(T):
    """Median ms of each stage of ctxpar's log-linear GDN alone, first shape of GDN_SHAPES."""
    from ctxpar.kernels.triton import gdn_function as F

    heads, k_dim, v_dim = GDN_SHAPES[0]
    B = batch_of(T)
    q, k, v, g, beta, lam = (x.detach().reshape(B * T, *x.shape[2:]) for x in gdn_inputs(*GDN_SHAPES[0], True)(B, T))
    spans, C = [(b, 0, T) for b in range(B)], F.DEFAULT_CHUNK
    scale = k_dim**-0.5  # the op's default
    ms = median_ms

    def plan():
        layout = F.build_layout(spans, [0] * B, T, C, F.READ_RUN, DEV)
        return layout, F.SlotGrid(layout, B * T, heads, heads, DEV), F.TreePlan(layout, DEV)

    layout, grid, tree_plan = plan()
    copies = F.tree_copies(tree_plan, heads, k.shape[-1], v.shape[-1], F.operand_dtype(q.dtype), DEV)
    o, qt, u, m, inv, pairs = F.chunk_stage(q, k, v, g, beta, lam, scale, layout, "tf32", tree_plan.rank, copies, False)
    log_c = C.bit_length() - 1
    lam_slots = F.slot_lambdas(lam, grid, layout, log_c)
    nodes, trans, copies = F.up_sweep(u, m, None, tree_plan, "tf32", copies[:2], False)  # u: a stand-in
    tree = [x.requires_grad_() for x in (nodes, *trans)]
    qt.requires_grad_()

    def reads():
        return F.CarryReads.apply(o, qt, lam_slots, None, tree_plan, log_c, "tf32", copies, v.dtype, *tree)

    d_reads = torch.randn_like(o, dtype=v.dtype)
    grads = [torch.randn_like(x) for x in (o, qt, u, m)]
    with torch.no_grad():
        times = {
            "layout, grid, tree plan (host)": ms(plan),
            "chunk stage": ms(lambda: F.chunk_stage(q, k, v, g, beta, lam, scale, layout, "tf32", tree_plan.rank,
                                                    copies[:2], False)),
            "up-sweep": ms(lambda: F.up_sweep(u, m, None, tree_plan, "tf32", copies[:2], False)),
            "reads": ms(reads),
            "chunk stage backward": ms(lambda: F.chunk_stage_grads(q, k, v, g, beta, lam, scale, inv, pairs, *grads,
                                                                   layout, "tf32", tree_plan.rank)),
        }
    times["reads fwd+bwd"] = ms(lambda: torch.autograd.grad(reads(), [qt, *tree], d_reads))
    row = dict(name="ctxpar_gdn_stage_ms", T=T, B=B, H=heads, stages=times)
    results.append(row)
    print(json.dumps(row), flush=True)


def breakdown(env, stages):
    """stages(T) for each T listed in the environment variable env: a diagnostic, never fatal."""
    for T in [int(x) for x in os.environ.get(env, "").split(",") if x]:
        if over_budget():
            break
        try:
            stages(T)
        except Exception as e:
            print(f"{env} breakdown failed:", repr(e)[:300], flush=True)


def main():
    from torch.nn.attention import SDPBackend

    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    ts = [int(x) for x in os.environ.get("TS", DEFAULT_TS).split(",")]
    # ctxpar first: on a fresh machine the first three 4K rows (ctxpar, then FLA's two ops) took
    # over 140 s, most likely FLA's autotuning; a BUDGET_S cut should fall on the anchors.
    gdn_ts = [int(x) for x in os.environ.get("GDN_TS", GDN_TS).split(",")]
    for T in ts:
        run_case("ctxpar_triton_loglinear_mamba2", T, log_linear_inputs, ctxpar_call)
    gdn_rows(gdn_ts, ctxpar_rows=True)
    breakdown("STAGES", stage_times)
    breakdown("GDN_STAGES", gdn_stage_times)
    fla_log_linear, fla_simple_gla = fla_ops()
    for T in ts:
        if fla_log_linear is not None and T <= 131072:
            run_case("fla_loglinear_mamba2", T, log_linear_inputs, fla_log_linear)
        if fla_simple_gla is not None:
            run_case("fla_simple_gla_mamba2", T, lambda B, T: mamba2_inputs(B, T, H), fla_simple_gla)
        if T <= 131072:
            run_case("sdpa_flash_hd64", T, sdpa_inputs, sdpa(SDPBackend.FLASH_ATTENTION))
            run_case("sdpa_cudnn_hd64", T, sdpa_inputs, sdpa(SDPBackend.CUDNN_ATTENTION))
    gdn_rows(gdn_ts, ctxpar_rows=False)
    write(os.environ.get("OUT", "."))


def write(out):
    try:
        plot(os.path.join(out, "bench_ops.png"))
    except Exception as e:  # the table matters more than the picture
        print("plot failed:", repr(e))
    print("\n%-40s %8s %2s %9s %9s %8s %7s" % ("op", "T", "B", "fwd_ms", "fb_ms", "Mtok/s", "GiB"))
    for r in results:
        if "stages" in r:
            print("%-40s %8d %2d stages ms: %s" % (r["name"], r["T"], r["B"],
                                                  ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items())))
        elif "error" in r:
            print("%-40s %8d %2d ERROR %s" % (r["name"], r["T"], r["B"], r["error"][:90]))
        else:
            print("%-40s %8d %2d %9.3f %9.3f %8.2f %7.2f" % (r["name"], r["T"], r["B"], r["fwd_ms"], r["fwdbwd_ms"],
                                                           r["fwdbwd_Mtok_s"], r["peak_GiB"]))


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["name"] for r in results):
        rows = [r for r in results if r["name"] == name and "fwdbwd_Mtok_s" in r]
        ax.plot([r["T"] for r in rows], [r["fwdbwd_Mtok_s"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sequence T (B = 8, 4 at 4K, 8K)")
    ax.set_ylabel("forward + backward, Mtok/s")
    ax.set_title("H200, bf16, H=32, K=128 (Hk=1), V=64")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
