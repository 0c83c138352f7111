"""sft: python|deepspeed|torchrun|mpirun|srun ... launch/sft.py --recipe R [key=value ...]  (= `llmtrain sft`)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("sft"))
