"""`llmtrain score` (= launch/score.py): print the rewards a trained reward model gives a preference or
conversation file.

  llmtrain score DIR --data F [--max-seq-len N] [--json OUT] [--device cpu]
DIR: final/ of `llmtrain reward` (or a LoRA final/: the adapter is merged in memory). F: JSONL/JSON/
Parquet rows {prompt?, chosen, rejected} (prints both rewards; the summary gives the pairwise accuracy)
or {messages} (prints one reward per conversation, read at the end of its last assistant turn).
One process; the summary line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..errors import LlmtrainError
from .common import report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="reward model directory (final/ of llmtrain reward)")
    p.add_argument("--data", required=True, help="preference or conversation file to score")
    p.add_argument("--max-seq-len", type=int, default=0, help="cut each sequence to N tokens, as data.max_seq_len "
                   "did in training (0 = whole sequences)")
    p.add_argument("--json", default=None, help="also write one JSON object per row to this file")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    from ..tools.score import RewardScorer, score_file, summary

    try:
        scorer = RewardScorer.load(args.model, device=args.device)
        rows = []
        out = open(args.json, "w") if args.json else None
        for row in score_file(scorer, args.data, max_seq_len=args.max_seq_len):
            rows.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
            if not args.quiet:
                if "bad" in row:
                    print(f"{row['line']}\tbad: {row['bad']}")
                elif "chosen" in row:
                    print(f"{row['line']}\tchosen {row['chosen']:+.4f}\trejected {row['rejected']:+.4f}")
                else:
                    print(f"{row['line']}\treward {row['reward']:+.4f}")
        if out:
            out.close()
    except LlmtrainError as e:
        return report(e)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary(rows)))
    return 0
