"""preflight on its own, under any launcher: the rank table, identity checks and an all-reduce probe.

    python|deepspeed|torchrun|mpirun|srun ... launch/preflight.py --recipe R [key=value ...]
    python launch/preflight.py --hostfile H      # can every host of a DeepSpeed hostfile be reached?
Exit status 0: all ranks agree; 2: a rank differs (named) or the launch environment is incomplete.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llmtrain.preflight import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
