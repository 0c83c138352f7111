"""dpo: python|deepspeed|torchrun|mpirun|srun ... launch/dpo.py --recipe R [key=value ...]  (= `llmtrain dpo`)"""
import sys

from llmtrain.cli import run

if __name__ == "__main__":
    sys.exit(run("dpo"))
