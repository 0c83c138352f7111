"""Every command of llmtrain, in one table: `llmtrain <command> [arguments]` (the `llmtrain` entry point,
also `python -m llmtrain`), and `launch/<command>.py`, which call the same functions.

Each command's module here parses its arguments, calls the library and turns an LlmtrainError into
one `error:` line and its exit status (errors.py); nothing else in the package parses a command line.
The training commands are the objectives' names (objectives.OBJECTIVES).
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

# command -> (module in llmtrain.cli, one line of help); training commands come from objectives.OBJECTIVES
TOOLS = {
    "prepare": ("prepare", "tokenize a recipe's data once, before training, where the run looks for it"),
    "plan": ("plan", "per-GPU memory of a recipe under ZeRO 0-3 (+offload) and what fits"),
    "inspect": ("inspect_data", "mask preview: a recipe's samples with their trained tokens highlighted"),
    "score": ("score", "print a reward model's rewards for a preference or conversation file"),
    "chat": ("chat", "chat with a trained model directory in the terminal"),
    "export": ("export", "merge a LoRA adapter into its base model (full safetensors directory)"),
    "preflight": ("preflight", "rank table, cross-rank consistency checks and a bandwidth probe (any launcher)"),
    "plot": ("plot", "draw or overlay run curves from metrics.jsonl"),
    "train-tokenizer": ("train_tokenizer", "train a byte-level BPE tokenizer with a ChatML template"),
}


def run(command: str, argv: Optional[list[str]] = None) -> int:
    """Run one command with its arguments (default: sys.argv[1:]); returns its exit status."""
    from ..objectives import OBJECTIVES

    argv = sys.argv[1:] if argv is None else argv
    if command in OBJECTIVES:
        from .train import main as train_main

        return train_main(command, argv)
    return importlib.import_module(f"{__name__}.{TOOLS[command][0]}").main(argv)


def usage() -> str:
    from ..objectives import OBJECTIVES

    rows = [(name, cls.summary) for name, cls in OBJECTIVES.items()]
    rows += [(name, text) for name, (_, text) in TOOLS.items()]
    width = max(len(name) for name, _ in rows)
    lines = "\n".join(f"  {name.ljust(width)}  {text}" for name, text in rows)
    return (f"usage: llmtrain <command> [arguments]   (llmtrain <command> --help for its arguments)\n\n"
            f"commands:\n{lines}\n")


def main(argv: Optional[list[str]] = None) -> int:
    from ..objectives import OBJECTIVES

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    command = argv[0]
    if command not in OBJECTIVES and command not in TOOLS:
        print(f"error: unknown command {command!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    return run(command, argv[1:])
