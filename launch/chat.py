"""`llmtrain chat` as a script: python launch/chat.py [arguments]  (arguments: llmtrain/cli/chat.py)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("chat"))
