"""pretrain: python|deepspeed|torchrun|mpirun|srun ... launch/pretrain.py --recipe R [key=value ...]  (= `llmtrain pretrain`)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("pretrain"))
