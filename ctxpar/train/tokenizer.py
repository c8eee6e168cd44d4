"""Tokenizers: a tiny built-in word tokenizer with a character fallback, or one loaded from a local path.

The built-in vocabulary is fixed in code (no file, no download): specials, digits, letters,
punctuation and the words of the synthetic tasks. A word outside it is spelled letter by letter,
so every digit of a pass key is its own token.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PUNCTUATION = list(".,?!:;'\"-()")
WORDS = (
    "the grass is green sky blue sun yellow here we go there and back again "
    "an important info hidden inside a lot of irrelevant text find it memorize remember "
    "pass key what keys values value query recall"
).split()

_PIECES = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    def __init__(self):
        words = list(dict.fromkeys(SPECIALS + list(string.digits) + list(string.ascii_lowercase) + PUNCTUATION + WORDS))
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.stoi[s] for s in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _PIECES.findall(text.lower()):
            if piece in self.stoi:
                ids.append(self.stoi[piece])
            else:
                ids.extend(self.stoi.get(ch, self.unk_id) for ch in piece)
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] for i in ids)


class HFTokenizer:
    """A tokenizer from a local file or directory (``tokenizer.json``); never fetched from a hub."""

    def __init__(self, path: str):
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer at {path} (expected a tokenizer.json or a directory with one)")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("loading a tokenizer from a path needs the 'tokenizers' package") from e
        self._tok = Tokenizer.from_file(str(file))
        self.eos_id = self._tok.token_to_id("</s>") or self._tok.token_to_id("<|endoftext|>") or 0

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str):
    """``"builtin"`` or a local path."""
    return WordTokenizer() if spec == "builtin" else HFTokenizer(spec)
