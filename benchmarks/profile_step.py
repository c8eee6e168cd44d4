"""Where the GPU time of one forward+backward goes: torch.profiler over the op (one GPU) or over
the context-parallel op (torchrun, one process per GPU), the top kernels per rank by total time.

    python3 benchmarks/profile_step.py --variant mamba2 --t 131072                 # one GPU
    torchrun --nproc_per_node 2 benchmarks/profile_step.py --variant mamba2 --t 1048576 --cp

Prints a table per rank and writes $OUT/profile_<variant>_<T>[_cp]_rank<r>.json (kernel name,
calls, total and mean microseconds). Inputs and the step are bench_cp's, so the figures line up.
"""

from __future__ import annotations

import argparse
import json
import os

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
    p.add_argument("--cp", action="store_true", help="context parallel over the torchrun world")
    p.add_argument("--scheme", default="allgather")
    p.add_argument("--top", type=int, default=20)
    return p.parse_args()


def kernel_table(prof) -> list[dict]:
    rows = [dict(name=e.key, calls=e.count, total_us=e.device_time_total, mean_us=e.device_time_total / max(e.count, 1))
            for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    return sorted(rows, key=lambda r: -r["total_us"])


def main():
    args = parse()
    rank, world = 0, 1
    if args.cp:
        dist.init_process_group("nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    cp = CPContext(dist.group.WORLD) if args.cp else None
    inputs = make_inputs(args.variant, args.t // world, device, seed=rank)
    run = step_fn(args.variant, inputs, num_levels(args.t), "auto", cp)
    for _ in range(2):  # compile and warm the caches
        run()
    torch.cuda.synchronize()
    if args.cp:
        dist.barrier()  # start together, so a rank's collective time is its wait for the others
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = kernel_table(prof)
    name = f"profile_{args.variant}_{args.t}{'_cp' if args.cp else ''}_rank{rank}"
    with open(os.path.join(os.environ.get("OUT", "."), name + ".json"), "w") as f:
        json.dump(rows, f, indent=1)
    total = sum(r["total_us"] for r in rows)
    lines = [f"== {name}: {total / 1e3:.2f} ms of kernels"]
    lines += [f"{r['total_us'] / 1e3:8.3f} ms {r['calls']:5d}x  {r['name'][:110]}" for r in rows[: args.top]]
    for r in range(world):  # one rank at a time, so the tables do not interleave
        if r == rank:
            print("\n".join(lines), flush=True)
        if args.cp:
            dist.barrier()
    if args.cp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
