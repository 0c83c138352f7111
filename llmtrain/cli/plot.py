"""`llmtrain plot` (= launch/plot.py): overlay run curves.

    llmtrain plot RUN_DIR [RUN_DIR ...] [--out FILE]

Reads each RUN_DIR/metrics.jsonl and draws train/eval loss, learning rate, tokens/s and (DPO)
reward accuracy and margin, one colour per run (tools/plots.py). Default --out: curves.png
in the single run's directory, or ./curves_compare.png for several runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from ..tools.plots import plot_runs, read_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run output_dir(s) holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png for one run, ./curves_compare.png for several)")
    args = p.parse_args(argv)
    runs = {}
    for d in args.run_dirs:
        if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
            print(f"error: {d} has no metrics.jsonl (is it a run's output_dir?)", file=sys.stderr)
            return 2
        label = os.path.basename(os.path.normpath(d))
        runs[label if label not in runs else d] = read_metrics(d)
    out = args.out or (os.path.join(args.run_dirs[0], "curves.png") if len(runs) == 1 else "curves_compare.png")
    print(plot_runs(runs, out))
    return 0
