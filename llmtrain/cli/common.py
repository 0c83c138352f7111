"""What every command shares: the recipe arguments, and an LlmtrainError as one line and an exit status."""
from __future__ import annotations

import argparse
import sys

from ..distributed.ranks import launcher_rank
from ..errors import LlmtrainError


def recipe_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """--recipe R [key=value ...], and the --local_rank the deepspeed launcher appends."""
    p = argparse.ArgumentParser(description=description, **kwargs)
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")


def report(e: LlmtrainError) -> int:
    """One `error:` line on stderr, printed once (by the launcher's rank 0: every rank raises the same
    error, and mpirun sets no RANK before the rendezvous); returns the error's exit status."""
    if launcher_rank() == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
