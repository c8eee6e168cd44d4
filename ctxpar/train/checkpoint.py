"""Atomic, exact checkpoints, whichever engine writes the state.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX`` holding ``progress.json`` (step, world
size, engine), one ``rng_<rank>.pt`` per rank, and what the engine's state writer puts there: the
native trainer writes the model (``model.safetensors`` + ``config.json``, so it also loads with
``load_pretrained``) and ``trainer.pt`` (optimizer, scheduler); the DeepSpeed trainer writes the
same model files plus the engine's own checkpoint. It is written under a hidden temporary name and
renamed into place with ``os.replace``: a process killed mid-write leaves only a stray temporary
directory, which loaders ignore, and the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ctxpar.train.parallel import Layout

PREFIX = "step_"
PROGRESS = "progress.json"
# Every rank calls it with the directory being written (or read); collective.
StateHook = Callable[[Path], None]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir, step: int, write_state: StateHook, layout: Layout, keep_last: int, engine: str) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if layout.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
        tmp.mkdir(parents=True)
    layout.barrier()
    torch.save(rng_state(), tmp / f"rng_{layout.rank}.pt")
    write_state(tmp)
    if layout.is_main:
        progress = {"step": step, "world_size": layout.world_size, "engine": engine}
        (tmp / PROGRESS).write_text(json.dumps(progress))
    layout.barrier()
    if layout.is_main:
        _fsync_dir(tmp)
        if final.exists():  # os.replace cannot replace a non-empty directory
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    layout.barrier()
    return final


def latest(run_dir) -> Path | None:
    root = checkpoint_dir(run_dir)
    done = sorted(root.glob(f"{PREFIX}*")) if root.exists() else []
    return done[-1] if done else None


def load(path: Path, read_state: StateHook, layout: Layout, engine: str) -> int:
    """Restore everything saved at ``path``; returns the step to continue from."""
    progress = json.loads((path / PROGRESS).read_text())
    if progress["engine"] != engine:
        raise ValueError(f"{path} was written by the {progress['engine']} engine, not {engine}: resume with the "
                         f"engine that wrote it, or start a new run from its weights with train.init_from")
    read_state(path)
    rng = path / f"rng_{layout.rank}.pt"
    if progress["world_size"] == layout.world_size and rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return progress["step"]


def prune(root: Path, keep_last: int) -> None:
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep_last]:
        shutil.rmtree(old)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    """Flush the files and the directory entry so a crash after the rename cannot expose empty files."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
