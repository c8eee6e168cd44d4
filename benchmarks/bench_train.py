"""Training-step benchmark of the 1M recipe's model: step time, tokens/s, MFU and peak memory per
GPU at 128K, 512K and 1M tokens per sequence, with the sequence split over the GPUs (CP = GPUs).

    python benchmarks/bench_train.py --gpus 2                    # spawns 2 ranks
    torchrun --nproc-per-node 2 benchmarks/bench_train.py --gpus 2
    python benchmarks/bench_train.py --gpus 1 --lengths 131072   # one GPU, no CP

Writes benchmarks/results/bench_train_<gpus>gpu.json (and prints a table). Each length runs
``--warmup`` untimed and ``--steps`` timed optimizer steps of one sequence (batch 1), with the
training loop's garbage collection between steps; each row says how long rank 0 spent in the
collector in its worst timed step. ``--profile N`` runs one more step under torch.profiler and
adds to each row, per rank, where the step's GPU time went (the N largest kernels and copies; the
device time as compute, NCCL kernels and copies) and where the compute stream sat idle (its
longest gaps, with what the host was doing); ``--set key=value`` overrides the recipe (e.g.
``train.offload_checkpoints=false``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from ctxpar.train.cli import launch_or_run
from ctxpar.train.collection import collect_between_steps
from ctxpar.train.config import load_recipe
from ctxpar.train.parallel import setup, teardown
from ctxpar.train.telemetry import NVML, peak_flops
from ctxpar.train.trainer import Trainer
from profile_step import kernel_table, stream_gaps

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "longctx-1m-2gpu.yaml"


def bench_rank(recipe, lengths, warmup, steps, out, top=0):
    """Every rank: time the steps at each length; rank 0 returns the results."""
    layout = setup(recipe.parallel.context_parallel_size, recipe.parallel.backend)
    nvml, rows = NVML(layout.device), []
    try:
        for length in lengths:
            rows.append(_bench_length(recipe, layout, nvml, length, warmup, steps, top))
            if layout.is_main:
                print(_format(rows[-1]), flush=True)
    finally:
        teardown(layout)
    if layout.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=2))
        return {"results": str(out)}
    return {}


def _bench_length(recipe, layout, nvml, length, warmup, steps, top):
    with tempfile.TemporaryDirectory() as tmp:
        r = recipe.model_copy(update={
            "out_dir": tmp,
            "train": recipe.train.model_copy(update={"seq_len": length, "batch_size": 1, "micro_batch_size": 0,
                                                     "steps": warmup + steps + (top > 0), "resume": False}),
        })
        trainer = Trainer(r, layout)
        torch.cuda.reset_peak_memory_stats(layout.device)
        times, pauses = [], GCPauses()
        with collect_between_steps(r.train.gc_every) as boundary, pauses:  # as Trainer.run steps
            for step in range(warmup + steps):
                torch.cuda.synchronize(layout.device)
                t, paused = time.perf_counter(), pauses.seconds
                boundary(step)  # timed: a step of the training loop pays for it
                trainer.step(step)
                torch.cuda.synchronize(layout.device)
                times.append((time.perf_counter() - t, pauses.seconds - paused))
            profiled = _profile_step(trainer, layout, warmup + steps, top) if top else None
        dt = statistics.median(t for t, _ in times[warmup:])
        gc_s = max(p for _, p in times[warmup:])
        flops = trainer.model.flops_per_token(length) * length / layout.world_size
        peak = peak_flops(layout.device, recipe.telemetry.peak_tflops)
        mine = {"rank": layout.rank, "peak_alloc_gib": torch.cuda.max_memory_allocated(layout.device) / 2**30,
                **nvml.read()}
        per_gpu, profiles = _from_every_rank(layout, mine), _from_every_rank(layout, profiled)
        params = trainer.model.num_params()
        del trainer
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # each length is a run of its own: its model compiles afresh
    row = {"seq_len": length, "gpus": layout.world_size, "cp": layout.cp_size, "step_s": dt, "gc_in_step_s": gc_s,
           "tokens_per_s": length / dt, "mfu": flops / dt / peak if peak else None,
           "params": params, "per_gpu": per_gpu}
    return row if profiled is None else {**row, "profile_per_rank": profiles}


class GCPauses:
    """Seconds this process spent in Python's garbage collector while inside (gc.callbacks)."""

    def __init__(self):
        self.seconds, self._start = 0.0, None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start


def _from_every_rank(layout, obj):
    if not layout.distributed:
        return [obj]
    objs = [None] * layout.world_size
    dist.all_gather_object(objs, obj)
    return objs


def _profile_step(trainer, layout, step, top):
    """One more step under torch.profiler: its wall time, the device's busy time (kernels and
    copies, summed over streams, so overlap can make it exceed the wall), split into compute,
    NCCL kernels (which include the wait for the other ranks) and copies, and the ``top`` largest."""
    torch.cuda.synchronize(layout.device)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step(step)
        torch.cuda.synchronize(layout.device)
    wall = time.perf_counter() - t
    rows = kernel_table(prof)
    seconds = lambda prefix: sum(r["total_us"] for r in rows if r["name"].startswith(prefix)) / 1e6  # noqa: E731
    device, nccl, copies = seconds(""), seconds("nccl"), seconds("Memcpy")
    return {"wall_s": wall, "device_s": device, "nccl_s": nccl, "copy_s": copies, "compute_s": device - nccl - copies,
            "compute_stream": stream_gaps(prof),
            "top": [{"name": r["name"][:160], "calls": r["calls"], "s": r["total_us"] / 1e6} for r in rows[:top]]}


def _format(row):
    mem = ", ".join(f"{g['peak_alloc_gib']:.1f}" for g in row["per_gpu"])
    mfu = f"{row['mfu']:.3f}" if row["mfu"] is not None else "n/a"
    line = (f"T={row['seq_len']:>8}  step {row['step_s']:.3f} s  {row['tokens_per_s'] / 1e3:.1f} Ktok/s  "
            f"MFU {mfu}  peak GiB per GPU [{mem}]  rank 0 in gc up to {row['gc_in_step_s']:.3f} s a step")
    lines = [line]
    for rank, prof in enumerate(row.get("profile_per_rank", [])):
        lines.append(f"  profiled step (rank {rank}): {prof['wall_s']:.3f} s wall; device {prof['device_s']:.3f} s = "
                     f"compute {prof['compute_s']:.3f} + nccl {prof['nccl_s']:.3f} + copies {prof['copy_s']:.3f}")
        gaps = prof["compute_stream"]
        lines.append(f"  compute stream: idle {gaps['idle_s']:.3f} s of {gaps['span_s']:.3f} s, "
                     f"{gaps['idle_in_gaps_over_1ms_s']:.3f} s of it in {gaps['gaps_over_1ms']} gaps over 1 ms; host "
                     f"synchronizes {gaps['host_syncs_s']:.3f} s; longest gaps:")
        lines += [f"  {g['ms']:8.2f} ms  after {g['after'][:40]}  before {g['before'][:40]}  host {g['host']}"
                  for g in gaps["top"]]
        lines += [f"  {k['s']:8.3f} s {k['calls']:6d}x  {k['name'][:100]}" for k in prof["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs = ranks = context-parallel size")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[131072, 524288, 1048576])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more step per length; keep its N largest kernels")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("bench_train needs CUDA GPUs")
    recipe = load_recipe(args.recipe, [f"parallel.context_parallel_size={args.gpus}", f"parallel.nproc={args.gpus}",
                                       "telemetry.progress_bar=false", "train.ckpt_every=0", *args.set])
    out = args.out or str(REPO / "benchmarks" / "results" / f"bench_train_{args.gpus}gpu.json")
    return launch_or_run(bench_rank, recipe, args.gpus, sorted(args.lengths), args.warmup, args.steps, out,
                         args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
