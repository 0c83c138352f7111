"""`llmtrain preflight` as a script: python launch/preflight.py [arguments]  (arguments: llmtrain/cli/preflight.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("preflight"))
