"""`llmtrain plot` as a script: python launch/plot.py [arguments]  (arguments: llmtrain/cli/plot.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("plot"))
