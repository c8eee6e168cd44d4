"""The 1M recipe's model in a DeepSpeed engine (ZeRO-2, context parallel over the GPUs): step time,
tokens/s and peak memory per GPU, to set beside bench_train.py's ctxpar-trainer figures at the
same length (run both in one job: see the command in the module's last lines).

    python benchmarks/bench_deepspeed.py --gpus 2 --lengths 262144
    python benchmarks/bench_train.py --gpus 2 --lengths 262144      # the ctxpar trainer, same model

Writes benchmarks/results/bench_deepspeed_<gpus>gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ctxpar.train.cli import launch_or_run
from ctxpar.train.config import load_recipe
from ctxpar.train.tokenizer import WordTokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "longctx-1m-2gpu.yaml"


def bench_rank(recipe, lengths, warmup, steps, stage, out):
    import deepspeed

    from ctxpar.comm.launch import init_process_group_from, resolve_launch
    from ctxpar.integrations.deepspeed import cp_loss, setup_context_parallel, split_batch, zero3_loss_module
    from ctxpar.models import CausalLM
    from ctxpar.train.trainer import set_activation_memory

    device = init_process_group_from(resolve_launch())
    cpx = setup_context_parallel(dist.get_world_size())
    cfg = recipe.model.model_copy(update={"vocab_size": recipe.model.vocab_size or WordTokenizer().vocab_size})
    lm = CausalLM(cfg)
    set_activation_memory(lm, recipe.train)
    config = cpx.deepspeed_config({
        # torch's AdamW: DeepSpeed's fused Adam JIT-builds with nvcc and fails to parse "9.0a".
        "optimizer": {"type": "AdamW", "params": {"lr": recipe.optim.lr, "weight_decay": recipe.optim.weight_decay,
                                                  "torch_adam": True}},
        "gradient_clipping": recipe.optim.grad_clip,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
    }, micro_batch=1)
    model = zero3_loss_module(lm)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=cpx.mpu)
    rows = []
    for length in lengths:
        torch.manual_seed(0)  # every rank draws the same sequence, then keeps its slice
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        ids, labels = split_batch(ids, cpx.cp_rank, cpx.cp_size)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(warmup + steps):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = cp_loss(*engine(ids, labels, cp=cpx.context), cpx, engine.zero_optimization_stage())
            engine.backward(loss)
            engine.step()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device) / 2**30)
        dt = statistics.median(times[warmup:])
        rows.append({"engine": f"deepspeed-zero{stage}", "seq_len": length, "gpus": dist.get_world_size(),
                     "cp": cpx.cp_size, "step_s": dt, "tokens_per_s": length / dt, "peak_alloc_gib": peaks,
                     "params": lm.num_params()})
        if dist.get_rank() == 0:
            r = rows[-1]
            print(f"deepspeed ZeRO-{stage} T={length:>8}  step {dt:.3f} s  {r['tokens_per_s'] / 1e3:.1f} Ktok/s  "
                  f"peak GiB per GPU {[round(p, 1) for p in peaks]}", flush=True)
    main_rank = dist.get_rank() == 0
    dist.destroy_process_group()
    if not main_rank:
        return {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    return {"results": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs = ranks = context-parallel size")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[262144])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("bench_deepspeed needs CUDA GPUs")
    recipe = load_recipe(str(RECIPE), [f"parallel.context_parallel_size={args.gpus}", f"parallel.nproc={args.gpus}"])
    out = args.out or str(REPO / "benchmarks" / "results" / f"bench_deepspeed_{args.gpus}gpu.json")
    return launch_or_run(bench_rank, recipe, args.gpus, args.lengths, args.warmup, args.steps, args.stage, out)


if __name__ == "__main__":
    raise SystemExit(main())
