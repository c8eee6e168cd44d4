"""Training data: synthetic long-context tasks generated on the fly, or local token / text files.

Every batch is a pure function of (seed, step): each rank builds the same global batch from a
generator seeded for that step and keeps its own rows. A resumed run therefore sees exactly the
batches the uninterrupted run would have, with no data-loader state to save.

A sample is ``ids [T + 1]`` plus ``target [T + 1]`` (which tokens are scored). ``shift`` turns it
into inputs and labels BEFORE the sequence is split across context-parallel ranks, so the label
of each rank's last token is the next rank's first token.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ctxpar.models.lm import IGNORE
from ctxpar.train.config import DataConfig
from ctxpar.train.tokenizer import WordTokenizer, load_tokenizer

FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again . "
TRAIN, HELDOUT, PASSKEY_EVAL = 0, 1, 2  # independent random streams

PREAMBLE = "there is an important info hidden inside a lot of irrelevant text . find it and memorize it . "


class PasskeyTask:
    """Passkey retrieval: a random n-digit key hidden at a depth of filler text, asked for at the end."""

    def __init__(self, digits: int = 5, tokenizer: WordTokenizer | None = None):
        self.tok = tokenizer or WordTokenizer()
        self.digits = digits
        enc = lambda text: torch.tensor(self.tok.encode(text))  # noqa: E731
        self.preamble, self.filler = enc(PREAMBLE), enc(FILLER)
        self.key_is, self.remember, self.restate = enc("the pass key is"), enc(". remember it ."), enc("is the pass key .")
        self.question = enc("what is the pass key ? the pass key is")
        self.digit_ids = torch.tensor([self.tok.stoi[str(d)] for d in range(10)])

    def sample(self, length: int, gen: torch.Generator, depth: float | None = None):
        """``length`` tokens ending with the key; the key's digits are the targets."""
        key = self.digit_ids[torch.randint(0, 10, (self.digits,), generator=gen)]
        needle = torch.cat([self.key_is, key, self.remember, key, self.restate])
        tail = torch.cat([self.question, key])
        room = length - len(self.preamble) - len(needle) - len(tail)
        if room < 0:
            raise ValueError(f"passkey needs at least {length - room} tokens, got {length}")
        if depth is None:
            depth = torch.rand((), generator=gen).item()
        filler = self.filler.repeat(room // len(self.filler) + 1)[:room]
        cut = round(depth * room)
        ids = torch.cat([self.preamble, filler[:cut], needle, filler[cut:], tail])
        # Scored: the key where it repeats inside the needle (a short-range copy, which teaches the
        # copying circuit early) and the answer at the end (the long-range retrieval).
        target = torch.zeros(length, dtype=torch.bool)
        repeat = len(self.preamble) + cut + len(self.key_is) + self.digits + len(self.remember)
        target[repeat : repeat + self.digits] = True
        target[-self.digits :] = True
        return ids, target


class MQARTask:
    """Multi-query associative recall: letter -> digit pairs, filler, then the letters asked again."""

    def __init__(self, pairs: int = 8, tokenizer: WordTokenizer | None = None):
        self.tok = tokenizer or WordTokenizer()
        if not 1 <= pairs <= 26:
            raise ValueError(f"mqar pairs must be in [1, 26], got {pairs}")
        self.pairs = pairs
        self.filler = self.tok.encode(FILLER)
        self.letters = torch.tensor([self.tok.stoi[c] for c in "abcdefghijklmnopqrstuvwxyz"])
        self.digits = torch.tensor([self.tok.stoi[str(d)] for d in range(10)])

    def sample(self, length: int, gen: torch.Generator, depth: float | None = None):
        keys = self.letters[torch.randperm(26, generator=gen)[: self.pairs]]
        values = self.digits[torch.randint(0, 10, (self.pairs,), generator=gen)]
        context = torch.stack([keys, values], 1).flatten()
        order = torch.randperm(self.pairs, generator=gen)
        queries = torch.stack([keys[order], values[order]], 1).flatten()
        room = length - 2 * context.numel()
        if room < 0:
            raise ValueError(f"mqar with {self.pairs} pairs needs at least {2 * context.numel()} tokens")
        filler = torch.tensor((self.filler * (room // len(self.filler) + 1))[:room], dtype=torch.long)
        ids = torch.cat([context, filler, queries])
        target = torch.zeros(length, dtype=torch.bool)
        target[-queries.numel() + 1 :: 2] = True  # the values of the queries
        return ids, target


class TokenStream:
    """Random windows of a flat token array: a uint16/uint32 .bin file, or tokenized JSONL text."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def sample(self, length: int, gen: torch.Generator, depth: float | None = None):
        if len(self.tokens) <= length:
            raise ValueError(f"the token file holds {len(self.tokens)} tokens, fewer than one sample ({length})")
        start = torch.randint(0, len(self.tokens) - length, (), generator=gen).item()
        ids = torch.from_numpy(self.tokens[start : start + length].astype(np.int64))
        return ids, torch.ones(length, dtype=torch.bool)


def read_bin(path: str, dtype: str) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def read_jsonl(path: str, tokenizer, field: str) -> np.ndarray:
    ids = []
    with open(path) as f:
        for line in f:
            if line.strip():
                ids.extend(tokenizer.encode(json.loads(line)[field]) + [tokenizer.eos_id])
    return np.asarray(ids, dtype=np.int64)


class Data:
    """The recipe's data source, its tokenizer, and the deterministic batch of each step."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.cfg.tokenizer)

    @cached_property
    def source(self):
        cfg = self.cfg
        if cfg.source == "passkey":
            return PasskeyTask(cfg.passkey_digits, self.tokenizer)
        if cfg.source == "mqar":
            return MQARTask(cfg.mqar_pairs, self.tokenizer)
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"data.path {cfg.path!r} does not exist")
        if cfg.source == "bin":
            return TokenStream(read_bin(cfg.path, cfg.dtype))
        return TokenStream(read_jsonl(cfg.path, self.tokenizer, cfg.text_field))

    def batch(self, step: int, batch_size: int, seq_len: int, stream: int = TRAIN, loss_on: str | None = None):
        """(inputs, labels) [batch_size, seq_len] of ``step`` in ``stream`` (TRAIN or HELDOUT)."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, stream, step))
        samples = [self.source.sample(seq_len + 1, gen) for _ in range(batch_size)]
        ids, target = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        return shift(ids, target, loss_on or self.cfg.loss_on)


def shift(ids, target, loss_on: str = "answer"):
    """Next-token pairs: inputs ids[:, :-1], labels ids[:, 1:] (IGNORE where not scored)."""
    labels = ids[:, 1:].clone()
    if loss_on == "answer":
        labels[~target[:, 1:]] = IGNORE
    return ids[:, :-1], labels


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (Python's hash() is salted for str)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = ((x ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x ^= x >> 31
    return x >> 1
