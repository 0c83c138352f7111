"""Mask preview: what will the model learn? Prints tokenized samples with trained tokens highlighted.

  python launch/inspect_data.py --recipe recipes/debug/sft.yaml [-n 3] [key=value ...]
  python launch/inspect_data.py --recipe R -n 100 --json masks.jsonl      # the same, as data

Trained tokens are shown green (or [[like this]] when the output is not a terminal), followed by
the share of trained tokens over the whole training split and the bad-row report. With --json,
one JSON object per row of the first N rows of data.train, in file order:
{"line": L, "input_ids": [...], "trained": [0/1, ...]} or {"line": L, "bad": "reason"}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmtrain.inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
