#!/usr/bin/env bash
# Idempotent set-up of a fresh CPU machine: a venv in .venv with the CPU build of torch (it must go
# in first: anything that resolves torch while none is installed pulls a multi-GB CUDA build),
# triton for the interpreter, and ctxpar with its test, MPI, monitoring and DeepSpeed extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.ctxpar-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -e ".[test,mpi,monitor,triton,deepspeed]" "triton==3.7.1"
    touch "$stamp"
fi
