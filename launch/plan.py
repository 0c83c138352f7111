"""Memory planner: python launch/plan.py --recipe R --gpus N --gpu-mem-gib M [--model-config config.json] [key=value ...]

Prints per-GPU memory for ZeRO 0/1/2/3 with and without CPU offload (model states, activations)
and recommends a stage, offload, micro-batch and gradient checkpointing that fit (llmtrain/plan.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llmtrain.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
