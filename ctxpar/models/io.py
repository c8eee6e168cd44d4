"""Save / load: ``model.safetensors`` + ``config.json`` in one directory.

Loading into a config with a longer ``max_seq_len`` (more lambda levels) keeps the trained levels
and leaves the new ones at their fresh initialisation: that is how a checkpoint continues at a
longer context.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ctxpar.models.config import ModelConfig
from ctxpar.models.lm import CausalLM

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_pretrained(model: CausalLM, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(model.cfg.model_dump_json(indent=2))


def load_config(directory) -> ModelConfig:
    return ModelConfig.model_validate(json.loads((Path(directory) / CONFIG).read_text()))


def load_pretrained(directory, **overrides) -> CausalLM:
    """The model saved in ``directory``; ``overrides`` change config fields (e.g. max_seq_len)."""
    cfg = load_config(directory).model_copy(update=overrides)
    cfg = ModelConfig.model_validate(cfg.model_dump())
    model = CausalLM(cfg)
    load_weights(model, load_file(str(Path(directory) / WEIGHTS)))
    return model


def load_weights(model: CausalLM, state: dict[str, torch.Tensor]) -> None:
    """Strict load, except that level tensors may hold fewer levels than the model (see module doc)."""
    own = model.state_dict()
    for name, saved in state.items():
        if name in own and own[name].shape != saved.shape and ".levels." in name:
            state[name] = _grow_levels(name, own[name], saved, model.cfg.n_heads)
    model.load_state_dict(state, strict=True)


def _grow_levels(name, fresh, saved, heads):
    """Copy the saved levels into the first slots of ``fresh``: gain [H, L] or proj.weight [H * L, d]."""
    grown = fresh.detach().clone()
    if name.endswith(".gain"):
        grown[:, : saved.shape[1]] = saved
    else:
        grown.view(heads, -1, fresh.shape[-1])[:, : saved.shape[0] // heads] = saved.view(heads, -1, saved.shape[-1])
    return grown
