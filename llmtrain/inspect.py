"""`launch/inspect_data.py`: show what is trained before spending GPU hours on it."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .config import ConfigError, load_config
from .data.chat import IGNORE_INDEX
from .data.sources import DataError


def highlight(tokenizer, ids: np.ndarray, labels: np.ndarray, color: bool) -> str:
    """Decode token by token; trained runs are wrapped in green (terminal) or [[ ]] (plain text)."""
    out, trained_run = [], []

    def flush():
        if trained_run:
            text = tokenizer.decode(trained_run)
            out.append(f"\033[42;30m{text}\033[0m" if color else f"[[{text}]]")
            trained_run.clear()

    for t, (tok, lab) in enumerate(zip(ids.tolist(), labels.tolist())):
        if lab != IGNORE_INDEX and t > 0:
            trained_run.append(tok)
        else:
            flush()
            out.append(tokenizer.decode([tok]))
    flush()
    return "".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Preview tokenized training samples and their loss mask")
    p.add_argument("--recipe", required=True)
    p.add_argument("-n", "--num-samples", type=int, default=3)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        from .data.prepare_samples import prepared_split
        from .models import load_tokenizer, tokenizer_hash
        from .tasks import prepare_request

        cfg = load_config(args.recipe, args.overrides)
        tok = load_tokenizer(cfg)
        # the same preparation a training run does (parallel, cached): a later run reuses it, and vice versa
        request = prepare_request(cfg, tokenizer_hash(tok), "data.train", "sft")
        request.max_bad_fraction = 1.0  # a preview shows every bad row instead of stopping at the budget
        samples, report = prepared_split(request, tok)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for i in range(min(args.num_samples, samples.num_seqs)):
        ids, labels = samples.seq(i)
        n_trained = int((labels[1:] != IGNORE_INDEX).sum())
        print(f"--- sample {i}: {len(ids)} tokens, {n_trained} trained ---")
        print(highlight(tok, ids, labels, color))
    targets = samples.seq_targets()
    total = int(samples.seq_lengths().sum())
    print(f"--- {samples.num_seqs} samples, {total} tokens, {int(targets.sum())} trained "
          f"({targets.sum() / max(total, 1):.1%}); mean length {total / max(samples.num_seqs, 1):.1f}, "
          f"max {int(samples.seq_lengths().max(initial=0))} (data.max_seq_len={cfg.data.max_seq_len})")
    print(f"--- {report.summary()}")
    if report.dropped_too_long:
        print(f"--- dropped {report.dropped_too_long} samples longer than data.max_seq_len (data.truncation=drop)")
    return 0
