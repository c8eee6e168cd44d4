"""Where the GPU time of one forward+backward goes: torch.profiler over the op (one GPU) or over
the context-parallel op (torchrun, one process per GPU), the top kernels per rank by total time.

    python3 benchmarks/profile_step.py --variant mamba2 --t 131072                 # one GPU
    python3 benchmarks/profile_step.py --variant gdn --t 32768 --batch 4           # bench_ops' 8K x 4
    python3 benchmarks/profile_step.py --variant gdn --t 524288 --heads 6 --k 192 --v 384   # the paper's shape
    torchrun --nproc_per_node 2 benchmarks/profile_step.py --variant mamba2 --t 1048576 --cp

Prints a table per rank and writes $OUT/profile_<variant>_<T>[x<batch>][_h<H>_k<K>_v<V>][_cp]_rank<r>.json
(kernel name, calls, total and mean microseconds; the compute stream's span, idle time and longest gaps: on a
CP rank, its waits for the others). Inputs and the step are bench_cp's, so the figures line up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bench_cp import make_inputs, step_fn
from ctxpar.cp import CPContext
from ctxpar.kernels import num_levels


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="mamba2", choices=["mamba2", "gdn"])
    p.add_argument("--t", type=int, default=131072, help="total tokens (split over the ranks with --cp)")
    p.add_argument("--batch", type=int, default=1, help="sequences the tokens are split into (one GPU)")
    p.add_argument("--heads", type=int, help="H (and Hk) instead of bench_cp's shape; with --k and --v")
    p.add_argument("--k", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--cp", action="store_true", help="context parallel over the torchrun world")
    p.add_argument("--scheme", default="allgather")
    p.add_argument("--top", type=int, default=20)
    return p.parse_args()


def kernel_table(prof) -> list[dict]:
    """Kernels and copies by total device time; ranges (``record_function``, DDP's and the
    collectives' own) are left out: their time is their kernels' again."""
    rows = [dict(name=e.key, calls=e.count, total_us=e.device_time_total, mean_us=e.device_time_total / max(e.count, 1))
            for e in prof.key_averages()
            if e.device_time_total > 0 and e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
    return sorted(rows, key=lambda r: -r["total_us"])


def trace_events(prof) -> list[dict]:
    """The profile's Chrome-trace events. The exporter replaces the file at the path it is given, so
    the trace is read through the path after the export, never through a handle opened before it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def stream_gaps(prof, top: int = 10) -> dict:
    """Where the busiest stream (the compute stream) sat idle: its idle time between its first and
    last kernel, and the ``top`` longest gaps with the kernels on either side (from the trace)."""
    return idle_report(trace_events(prof), top)


def idle_report(events: list[dict], top: int = 10) -> dict:
    """stream_gaps over trace events (times in microseconds, as the trace writes them)."""
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy") and "dur" in e]
    streams = {}
    for e in kernels:
        streams.setdefault(e["args"].get("stream"), []).append(e)
    busiest = sorted(max(streams.values(), key=lambda es: sum(e["dur"] for e in es)), key=lambda e: e["ts"])
    gaps, end, before = [], busiest[0]["ts"], busiest[0]
    for e in busiest:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, before["name"][:80], e["name"][:80], end))
        if e["ts"] + e["dur"] >= end:
            end, before = e["ts"] + e["dur"], e
    gaps.sort(reverse=True)
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e]
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function") and "dur" in e]
    return {"span_s": (end - busiest[0]["ts"]) / 1e6, "idle_s": sum(g[0] for g in gaps) / 1e6,
            "gaps_over_1ms": sum(g[0] > 1e3 for g in gaps), "idle_in_gaps_over_1ms_s": sum(g[0] for g in gaps if g[0] > 1e3) / 1e6,
            "host_syncs_s": sum(e["dur"] for e in runtime if "Synchronize" in e["name"]) / 1e6,
            "top": [{"ms": g[0] / 1e3, "after": g[1], "before": g[2], "host": _host_during(runtime, host, g[3], g[3] + g[0])}
                    for g in gaps[:top]]}


def _host_during(runtime, host, start, end):
    """What the host did while the stream sat idle over [start, end): the longest CUDA runtime
    call overlapping it (e.g. a synchronize) and the innermost three host ops that cover half of it."""
    overlap = lambda e: min(end, e["ts"] + e["dur"]) - max(start, e["ts"])  # noqa: E731
    calls = [e for e in runtime if overlap(e) > 0]
    ops = sorted((e for e in host if overlap(e) >= (end - start) / 2), key=lambda e: e["dur"])[:3]
    longest = max(calls, key=lambda e: e["dur"])["name"] if calls else "-"
    return " < ".join([longest] + [e["name"][:60] for e in ops])


def main():
    args = parse()
    rank, world = 0, 1
    if args.cp:
        dist.init_process_group("nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    cp = CPContext(dist.group.WORLD) if args.cp else None
    if args.heads and not (args.k and args.v):
        raise SystemExit("--heads takes --k and --v with it")
    if args.t % (world * args.batch) or (args.cp and args.batch > 1):
        raise SystemExit(f"--t {args.t} must split into {world} ranks x {args.batch} sequences (--batch without --cp)")
    length = args.t // (world * args.batch)
    shape = dict(H=args.heads, Hk=args.heads, K=args.k, V=args.v) if args.heads else None
    inputs = [x.reshape(args.batch, length, *x.shape[2:]) if x is not None else None
              for x in make_inputs(args.variant, args.t // world, device, rank, shape)]
    run = step_fn(args.variant, inputs, num_levels(args.t // args.batch), "auto", cp)
    for _ in range(2):  # compile and warm the caches
        run()
    torch.cuda.synchronize()
    if args.cp:
        dist.barrier()  # start together, so a rank's collective time is its wait for the others
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows, idle = kernel_table(prof), stream_gaps(prof, top=5)
    batch = f"x{args.batch}" if args.batch > 1 else ""
    tag = f"_h{args.heads}_k{args.k}_v{args.v}" if args.heads else ""
    name = f"profile_{args.variant}_{args.t}{batch}{tag}{'_cp' if args.cp else ''}_rank{rank}"
    with open(os.path.join(os.environ.get("OUT", "."), name + ".json"), "w") as f:
        json.dump({"kernels": rows, "compute_stream": idle}, f, indent=1)
    total = sum(r["total_us"] for r in rows)
    lines = [f"== {name}: {total / 1e3:.2f} ms of kernels"]
    lines += [f"{r['total_us'] / 1e3:8.3f} ms {r['calls']:5d}x  {r['name'][:110]}" for r in rows[: args.top]]
    lines.append(f"compute stream: span {idle['span_s'] * 1e3:.2f} ms, idle {idle['idle_s'] * 1e3:.2f} ms")
    lines += [f"  gap {g['ms']:.3f} ms after {g['after'][:50]} before {g['before'][:50]}" for g in idle["top"]]
    for r in range(world):  # one rank at a time, so the tables do not interleave
        if r == rank:
            print("\n".join(lines), flush=True)
        if args.cp:
            dist.barrier()
    if args.cp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
