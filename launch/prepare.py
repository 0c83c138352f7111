"""Tokenize a pretraining recipe's corpora into token shards, once, before training:

    python launch/prepare.py --recipe recipes/debug/pretrain.yaml [--workers N] [key=value ...]

Every data.train / data.eval entry with `prepare_from` (raw .txt/.jsonl/.json/.parquet files,
globs, saved datasets, or a hub dataset with the entry's name/split/revision/streaming) is tokenized with the recipe's tokenizer into its `path`, in parallel
worker processes with a progress bar. Interrupted runs resume (finished shards are kept); a
rerun on unchanged input is a no-op. Entries without `prepare_from` are only checked.

    python launch/prepare.py --recipe recipes/debug/sft.yaml --task sft [--workers N]

SFT/DPO recipes (--task sft|dpo): data.train and data.eval are prepared into data.cache_dir
exactly as a training run would prepare them (e.g. on a CPU node before a GPU job); the run then
starts from them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llmtrain.data.pretrain import prepare_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare_main())
