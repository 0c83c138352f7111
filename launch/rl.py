"""rl: python|deepspeed|torchrun|mpirun|srun ... launch/rl.py --recipe R [key=value ...]  (= `llmtrain rl`)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("rl"))
