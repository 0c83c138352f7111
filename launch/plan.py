"""`llmtrain plan` as a script: python launch/plan.py [arguments]  (arguments: llmtrain/cli/plan.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("plan"))
