"""`llmtrain prepare` (= launch/prepare.py): tokenize a recipe's data once, before training, where the run looks.

    llmtrain prepare --recipe recipes/debug/pretrain.yaml [--workers N] [key=value ...]

Pretraining (the default --task): every data.train / data.eval entry with `prepare_from` (raw
.txt/.jsonl/.json/.parquet files, globs, saved datasets, or a hub dataset with the entry's
name/split/revision/streaming) is tokenized with the recipe's tokenizer into its `path`, in
parallel worker processes with a progress bar. Interrupted runs resume (finished shards are kept);
a rerun on unchanged input is a no-op. Entries without `prepare_from` are only checked.

    llmtrain prepare --recipe recipes/debug/sft.yaml --task sft [--workers N]

SFT/DPO/reward/RL recipes (--task sft|dpo|reward|rl; RL: the prompts): data.train and data.eval are prepared into data.cache_dir
exactly as a training run would prepare them (e.g. on a CPU node before a GPU job); the run then
starts from them.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from ..config import check_produced_inputs, load_config
from ..data.protocol import DataContext
from ..data.shards.recipe import PrepareOptions
from ..data.tokenizer_id import tokenizer_hash
from ..errors import LlmtrainError
from ..models.tokenizer import load_tokenizer
from ..objectives import OBJECTIVES
from .common import add_overrides, recipe_parser, report


def main(argv: Optional[list[str]] = None) -> int:
    p = recipe_parser("Tokenize a recipe's data once, before training. Pretraining: raw corpora "
                      "(data.*[].prepare_from) into token shards at data.*[].path; SFT/DPO (--task): "
                      "data.train/data.eval into data.cache_dir, where runs find it. Resumable; a rerun on "
                      "the same input is a no-op.")
    p.add_argument("--task", choices=sorted(OBJECTIVES), default="pretrain", help="the recipe's task (default pretrain)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes (default: CPU cores - 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--docs-per-shard", type=int, help="pretraining: rows (lines, records, .txt files) per shard "
                                                     "(default 50000)")
    g.add_argument("--tokens-per-shard", type=int, help="pretraining: approximate tokens per shard instead")
    add_overrides(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        check_produced_inputs(cfg)  # an input another command makes: one line naming it
        tokenizer = load_tokenizer(cfg.model)  # exactly as training loads it, so the hashes match
        ctx = DataContext.of(cfg, tokenizer, None, tokenizer_hash(tokenizer))
        opts = PrepareOptions(args.workers, args.docs_per_shard, args.tokens_per_shard, progress=cfg.logging.progress)
        OBJECTIVES[args.task].from_config(cfg).prepare_data(ctx, opts)
    except LlmtrainError as e:
        return report(e)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
