"""``ctxpar train [recipe.yaml] [--set key=value ...]``.

Under a launcher (torchrun, srun, mpirun, deepspeed: the environment names a world of several
ranks) every process joins the job. Without one, the command launches its own ranks on this
machine: one per GPU, or 2 gloo ranks on CPU (``parallel.nproc`` overrides), each running the same
function. ``recipe.engine`` and ``parallel.data_parallel`` pick the trainer that runs the steps
(``trainer.trainer_class``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import torch
import torch.multiprocessing as mp

from ctxpar.comm.launch import resolve_launch
from ctxpar.train.config import Recipe, RecipeError, load_recipe


def main(argv=None) -> int:
    from ctxpar.train.trainer import train

    parser = argparse.ArgumentParser(prog="ctxpar train", description="train a log-linear model from a YAML recipe")
    parser.add_argument("recipe", nargs="?", help="a YAML recipe (default: the embedded quickstart)")
    add_launch_args(parser)
    args = parser.parse_args(argv)
    recipe = recipe_from_args(args.recipe, args)
    if recipe is None:
        return 2
    return launch_or_run(train, recipe, args.nproc)


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.steps=50 (repeatable)")
    parser.add_argument("--nproc", type=int, help="ranks to launch when no launcher is around (parallel.nproc)")


def recipe_from_args(path: str | None, args) -> Recipe | None:
    """The validated recipe, or None after printing why it is invalid."""
    try:
        return load_recipe(path, args.overrides)
    except (RecipeError, OSError) as e:
        print(f"ctxpar: {e}", file=sys.stderr)
        return None


def launch_or_run(fn, recipe: Recipe, nproc: int | None, *args) -> int:
    """Run ``fn(recipe, *args)`` on every rank: join an existing launch, or start the ranks here."""
    if resolve_launch().world_size > 1:
        _report(fn(recipe, *args))
        return 0
    n = nproc or _default_nproc(recipe)
    if n == 1:
        _report(fn(recipe, *args))
        return 0
    try:
        mp.start_processes(_rank_main, args=(n, _free_port(), fn, recipe, args), nprocs=n, start_method="spawn")
    except mp.ProcessRaisedException as e:
        print(f"ctxpar: a rank failed:\n{e}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as e:
        print(f"ctxpar: a rank died: {e}", file=sys.stderr)
        return 1
    return 0


def _default_nproc(recipe: Recipe) -> int:
    if recipe.parallel.nproc != "auto":
        return recipe.parallel.nproc
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _rank_main(local_rank: int, world: int, port: int, fn, recipe: Recipe, args: tuple) -> None:
    """One self-launched rank: export what torchrun would, then run like any launched rank."""
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo over loopback
    _die_with_launcher()
    _report(fn(recipe, *args))


def _die_with_launcher() -> None:
    """On Linux, SIGTERM this rank when the launching process dies, so that no orphaned rank keeps
    training; the trainer's preemption guard turns the signal into a checkpoint and a clean exit."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _report(summary: dict) -> None:
    """Print rank 0's summary (the other ranks return an empty one)."""
    if not summary:
        return
    print("summary:")
    for key, value in summary.items():
        if not isinstance(value, dict):
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
