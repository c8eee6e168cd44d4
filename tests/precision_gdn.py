"""Relative errors of the Triton GDN op on bf16 inputs against the float64 oracle on the rounded
inputs: the output's and every gradient's, the largest over a few seeded draws, so that two
checkouts (a branch against main) compare on the same inputs. A measurement, not a test: the
bounds are asserted by test_triton_gdn.py (CPU) and test_triton_gpu.py (-m gpu).

    PYTHONPATH=. python tests/precision_gdn.py --out errors.json   # from the checkout to measure

(a checkout without this file runs main's copy by its path, from that checkout).

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 with bf16 as on the GPU
(tests/interpreter.py).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

from tests import interpreter  # noqa: E402

interpreter.prepare()

from ctxpar.kernels.triton import chunked  # noqa: E402
from tests.factories import attention_inputs  # noqa: E402
from tests.oracle_check import half_precision_errors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {  # name: (H, Hk, K, V)
    "hk2_k64_v64": (2, 2, 64, 64),
    "hk1_k32_v64": (2, 1, 32, 64),
}


def errors(seed, T, H, HK, K, V, chunk):
    """{output or gradient name: relative error} of one seeded draw."""
    torch.manual_seed(seed)
    q, k, v, g, beta, lam = attention_inputs(1, T, H, K, V, Hk=HK, gdn=True, device=DEVICE)
    return half_precision_errors(chunked, (q * K**-0.5, k, v, g, beta, lam), [(0, 0, T)], None, False, torch.bfloat16,
                                 chunk_size=chunk)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64, help="smaller chunks: a deeper tree at the same T")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()
    table = {}
    for name, shape in SHAPES.items():
        draws = [errors(seed, args.tokens, *shape, args.chunk) for seed in range(args.draws)]
        table[name] = {key: max(d[key] for d in draws) for key in draws[0]}
        print(f"{name:14s}", " ".join(f"{key}={err:.2e}" for key, err in table[name].items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": DEVICE, "tokens": args.tokens, "chunk": args.chunk, "draws": args.draws,
                       "errors": table}, f, indent=1)


if __name__ == "__main__":
    main()
