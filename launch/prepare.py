"""`llmtrain prepare` as a script: python launch/prepare.py [arguments]  (arguments: llmtrain/cli/prepare.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("prepare"))
