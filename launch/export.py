"""`llmtrain export` as a script: python launch/export.py [arguments]  (arguments: llmtrain/cli/export.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("export"))
