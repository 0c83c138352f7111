"""reward: python|deepspeed|torchrun|mpirun|srun ... launch/reward.py --recipe R [key=value ...]  (= `llmtrain reward`)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("reward"))
