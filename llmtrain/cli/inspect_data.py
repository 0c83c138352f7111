"""`llmtrain inspect` (= launch/inspect_data.py): what will the model learn? Tokenized samples with
trained tokens highlighted (tools/mask_preview.py).

  llmtrain inspect --recipe recipes/debug/sft.yaml [-n 3] [key=value ...]
  llmtrain inspect --recipe R -n 100 --json masks.jsonl      # the same, as data

Trained tokens are shown green (or [[like this]] when the output is not a terminal); only the first
N rows are read and encoded. When data.train is prepared already (by a training run or
`llmtrain prepare`), the share of trained tokens over the whole split and its bad-row report follow. With --json,
one JSON object per row of the first N rows of data.train, in file order:
{"line": L, "input_ids": [...], "trained": [0/1, ...]} or {"line": L, "bad": "reason"}.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..config import check_produced_inputs, load_config
from ..data.tokenizer_id import tokenizer_hash
from ..errors import LlmtrainError
from ..models.tokenizer import load_tokenizer
from ..tools.mask_preview import prepared_train_split, print_rows, print_split_figures, write_json
from .common import report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Preview tokenized training samples and their loss mask")
    p.add_argument("--recipe", required=True)
    p.add_argument("-n", "--num-samples", type=int, default=3)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--json", metavar="OUT", help="write the first N rows' token ids and trained flags as JSON Lines")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        cfg = load_config(args.recipe, args.overrides)
        check_produced_inputs(cfg)  # an input another command makes: one line naming it
        tok = load_tokenizer(cfg.model)
        if args.json:
            write_json(tok, cfg.data, args.num_samples, args.json)
            return 0
        print_rows(tok, cfg.data, args.num_samples, color)
        samples = prepared_train_split(cfg.data, cfg.output_dir, tok, tokenizer_hash(tok))
    except LlmtrainError as e:
        return report(e)
    except OSError as e:  # --json OUT in a missing or read-only directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    if samples is None:
        print(f"--- data.train is not prepared yet, so no whole-split figures: `llmtrain prepare --recipe "
              f"{args.recipe} --task sft` (or the training run) prepares it, and this preview then shows them")
        return 0
    print_split_figures(samples, cfg.data.max_seq_len)
    return 0
