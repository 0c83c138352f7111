"""`llmtrain inspect` as a script: python launch/inspect_data.py [arguments]  (arguments: llmtrain/cli/inspect_data.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("inspect"))
