"""Evaluation: passkey accuracy over length x depth, and held-out loss by token position.

``ctxpar eval RUN_DIR`` reloads the run's recipe and latest checkpoint and launches like
``ctxpar train`` (the same ranks, the same context parallelism), so long prompts are split across
ranks exactly as in training. Passkey accuracy is exact match of every key digit under teacher
forcing, which equals greedy decoding: greedy output is right iff each next digit is the argmax.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctxpar.models import CausalLM, token_stats
from ctxpar.train.config import Recipe
from ctxpar.train.data import HELDOUT, PASSKEY_EVAL, Data, PasskeyTask, hash_seed, shift
from ctxpar.train.parallel import Layout, gather_sequence
from ctxpar.train.telemetry import line_plot, pyplot


@torch.no_grad()
def sequence_stats(model: CausalLM, inputs, labels, recipe: Recipe, layout: Layout):
    """Per-token NLL and correctness [B, T] of whole sequences (forward split across CP ranks)."""
    from ctxpar.train.trainer import autocast

    x, y = layout.split(inputs).to(layout.device), layout.split(labels).to(layout.device)
    with autocast(recipe, layout.device):
        hidden = model(x, layout.cp_context())
    nll, correct = token_stats(model, hidden, y, recipe.train.loss_tile)
    return gather_sequence(nll, layout).cpu(), gather_sequence(correct, layout).cpu()


def passkey_sweep(model, data: Data, recipe: Recipe, layout: Layout) -> dict[int, dict[float, np.ndarray]]:
    """{length: {depth: fraction of the key's digits right, one entry per prompt}} (``eval.samples`` each)."""
    ec = recipe.eval
    task = PasskeyTask(recipe.data.passkey_digits, data.tokenizer)
    table = {}
    for length in ec.passkey_lengths or [recipe.train.seq_len]:
        per_batch = max(1, recipe.train.seq_len * max(1, recipe.train.micro_batch_size) // length)
        table[length] = {}
        for i, depth in enumerate(ec.passkey_depths):
            gen = torch.Generator().manual_seed(hash_seed(recipe.train.seed, PASSKEY_EVAL, length, i))
            samples = [task.sample(length + 1, gen, depth) for _ in range(ec.samples)]
            fractions = []
            for start in range(0, len(samples), per_batch):
                chunk = samples[start : start + per_batch]
                x, y = shift(torch.stack([s[0] for s in chunk]), torch.stack([s[1] for s in chunk]))
                _, correct = sequence_stats(model, x, y, recipe, layout)
                # The answer is the last `digits` labels (the needle's own repeat is scored in training only).
                fractions.append(correct[:, -task.digits :].float().mean(1))
            table[length][depth] = torch.cat(fractions).numpy()
    return table


def loss_by_position(model, data: Data, recipe: Recipe, layout: Layout) -> np.ndarray:
    """Mean held-out NLL at each position [seq_len] of the tokens training scores (NaN elsewhere)."""
    tc = recipe.train
    batch = max(1, tc.micro_batch_size or tc.batch_size // layout.dp_size)
    rows = []
    for i in range(recipe.eval.heldout_batches):
        x, y = data.batch(i, batch, tc.seq_len, stream=HELDOUT)
        rows.append(sequence_stats(model, x, y, recipe, layout)[0])
    return torch.cat(rows).nanmean(0).numpy()


def evaluate(model, data: Data, recipe: Recipe, layout: Layout, out_dir: Path) -> dict:
    """Run both evaluations on every rank; rank 0 prints and writes eval.json and the PNGs."""
    results = {}
    if recipe.data.tokenizer == "builtin":
        fractions = passkey_sweep(model, data, recipe, layout)
        table = {n: {d: float((f == 1).mean()) for d, f in row.items()} for n, row in fractions.items()}
        results["passkey"] = {str(n): {str(d): a for d, a in row.items()} for n, row in table.items()}
        results["passkey_accuracy"] = float(np.mean([a for row in table.values() for a in row.values()]))
        results["passkey_digit_accuracy"] = float(np.mean([f.mean() for row in fractions.values() for f in row.values()]))
    position = loss_by_position(model, data, recipe, layout) if recipe.eval.heldout_batches else None
    if position is not None:
        results["heldout_loss"] = float(np.nanmean(position))  # per position first: late tokens count as much as early
    if layout.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if "passkey" in results:
            print(format_table(table))
            plot_heatmap(table, out_dir / "passkey.png")
        record = dict(results)
        if position is not None:
            plot_by_position(position, out_dir / "loss_by_position.png")
            record["loss_by_position"] = _finite(position)
        (out_dir / "eval.json").write_text(json.dumps(record, indent=2))
    return results


def format_table(table: dict[int, dict[float, float]]) -> str:
    depths = next(iter(table.values())).keys()
    lines = ["passkey accuracy (exact match)", "length  " + " ".join(f"{'d=' + format(d, 'g'):>7}" for d in depths)]
    for length, row in table.items():
        lines.append(f"{length:<7} " + " ".join(f"{a:7.2f}" for a in row.values()))
    return "\n".join(lines)


def plot_heatmap(table, out: Path) -> None:
    plt = pyplot()
    lengths, depths = list(table), list(next(iter(table.values())))
    grid = np.array([[table[n][d] for d in depths] for n in lengths])
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2, 0.6 * len(lengths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.5 else "k")
    fig.colorbar(im, label="exact-match accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_by_position(position: np.ndarray, out: Path) -> None:
    # dots: task data scores few positions
    line_plot(np.arange(len(position)), position, "token position", "held-out NLL (nats)", out,
              xscale="log", style=".-", lw=0.8)


def _finite(x: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in x]


def eval_run(recipe: Recipe, checkpoint_path: str | None = None) -> dict:
    """Every rank: load the model of ``checkpoint_path`` (default: the run's latest) and evaluate."""
    from ctxpar.models.io import load_pretrained
    from ctxpar.train import checkpoint
    from ctxpar.train.parallel import setup, teardown

    path = Path(checkpoint_path) if checkpoint_path else checkpoint.latest(recipe.run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {recipe.run_dir}; train first or pass --checkpoint")
    layout = setup(recipe.parallel.context_parallel_size, recipe.parallel.backend)
    try:
        longest = max(recipe.eval.passkey_lengths + [recipe.train.seq_len])
        model = load_pretrained(path)
        if longest > model.cfg.max_seq_len:  # more lambda levels; the new ones keep their initial values
            model = load_pretrained(path, max_seq_len=longest)
        model = model.to(layout.device).eval()
        results = evaluate(model, Data(recipe.data, recipe.train.seed), recipe, layout, recipe.run_dir / "eval")
        return results if layout.is_main else {}
    finally:
        teardown(layout)


def main(argv=None) -> int:
    from ctxpar.train.cli import add_launch_args, launch_or_run, recipe_from_args

    parser = argparse.ArgumentParser(prog="ctxpar eval", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (holding recipe.yaml and checkpoints/) or a recipe file")
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    add_launch_args(parser)
    args = parser.parse_args(argv)
    run = Path(args.run)
    recipe = recipe_from_args(str(run / "recipe.yaml") if run.is_dir() else args.run, args)
    if recipe is None:
        return 2
    return launch_or_run(eval_run, recipe, args.nproc, args.checkpoint)
