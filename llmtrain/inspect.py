"""`launch/inspect_data.py`: show what is trained before spending GPU hours on it."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .config import ConfigError, load_config, sources
from .data.chat import IGNORE_INDEX
from .data.sources import BadRowReport, DataError


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
        from .data.sft import build_sft_samples
        from .models import load_tokenizer

        cfg = load_config(args.recipe, args.overrides)
        tok = load_tokenizer(cfg)
        report = BadRowReport()
        samples = build_sft_samples(tok, sources(cfg, "data.train"), cfg.data.max_seq_len, cfg.data.truncation,
                                    "data.train", report)
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
    total = int(np.diff(samples.offsets).sum())
    print(f"--- {samples.num_seqs} samples, {total} tokens, {int(targets.sum())} trained "
          f"({targets.sum() / max(total, 1):.1%}); mean length {total / max(samples.num_seqs, 1):.1f}, "
          f"max {int(np.diff(samples.offsets).max(initial=0))} (data.max_seq_len={cfg.data.max_seq_len})")
    print(f"--- {report.summary()}")
    if report.dropped_too_long:
        print(f"--- dropped {report.dropped_too_long} samples longer than data.max_seq_len (data.truncation=drop)")
    return 0
