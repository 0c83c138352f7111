"""`llmtrain train-tokenizer` as a script: python launch/train_tokenizer.py [arguments]  (arguments: llmtrain/cli/train_tokenizer.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("train-tokenizer"))
