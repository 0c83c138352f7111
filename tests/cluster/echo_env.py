"""Print what a rank sees of its launch environment as one JSON line (tests/test_slurm_harness.py)."""
import json
import os
import sys

KEYS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT",
        "OMP_NUM_THREADS", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# One write call per line: ranks sharing a stdout (the deepspeed launcher) must not interleave mid-line.
sys.stdout.write(json.dumps({**{k: os.environ.get(k) for k in KEYS}, "argv": sys.argv[1:]}) + "\n")
sys.stdout.flush()
