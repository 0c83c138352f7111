"""Mask preview: what will the model learn? Prints tokenized samples with trained tokens highlighted.

  python launch/inspect_data.py --recipe recipes/debug/sft.yaml [-n 3] [key=value ...]

Trained tokens are shown green (or [[like this]] when the output is not a terminal), followed by
the share of trained tokens over the whole training split and the bad-row report.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmtrain.inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
