"""pretrain entry point: python|deepspeed|torchrun|mpirun|srun ... launch/pretrain.py --recipe R [key=value ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llmtrain.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pretrain"))
