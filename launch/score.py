"""score: python launch/score.py DIR --data F  (= `llmtrain score`): rewards of a preference or conversation file"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("score"))
