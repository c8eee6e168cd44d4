"""The `ctxpar` command: `ctxpar train | eval | env`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "env": ("ctxpar.env", "report versions, GPUs and which backends can run here"),
    "train": ("ctxpar.train.cli", "train a log-linear model from a YAML recipe"),
    "eval": ("ctxpar.train.evaluate", "needle/passkey and loss-by-position evaluation"),
}


def usage() -> str:
    lines = ["usage: ctxpar <command> [args]", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def take_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` that the deepspeed launcher puts before the command.
    The launcher also exports LOCAL_RANK, which wins; the flag fills it in only when it is missing."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--local_rank", "--local-rank", type=int)
    known, rest = parser.parse_known_args(argv)
    if known.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(known.local_rank))
    return rest


def main(argv=None) -> int:
    argv = take_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ctxpar: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
