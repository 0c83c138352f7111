"""`llmtrain plan` (= launch/plan.py): per-GPU memory of a recipe under ZeRO 0-3 (+offload) and what fits.

    llmtrain plan --recipe R --gpus N --gpu-mem-gib M [--model-config config.json] [key=value ...]

Prints per-GPU memory for ZeRO 0/1/2/3 with and without CPU offload (model states, activations)
and recommends a stage, offload, micro-batch and gradient checkpointing that fit (tools/memory_plan.py).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

from ..config import check_produced_inputs, load_config
from ..errors import ConfigError, LlmtrainError
from ..tools.memory_plan import report as memory_report
from .common import report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Per-GPU memory of a recipe under ZeRO 0-3 (+offload) and what fits.")
    p.add_argument("--recipe", required=True)
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (ranks) of the run")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU, GiB (H100 80GB: 79)")
    p.add_argument("--model-config", help="config.json (file or directory) when the recipe's model is not readable here")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="CUDA context, NCCL and allocator slack per GPU")
    p.add_argument("--eager-attention", action="store_true", help="attention scores are stored (no flash/sdpa)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for training")
    args = p.parse_args(argv)
    try:
        if args.gpus < 1 or args.gpu_mem_gib <= 0:
            raise ConfigError("--gpus must be >= 1 and --gpu-mem-gib > 0")
        cfg = load_config(args.recipe, args.overrides)
        check_produced_inputs(cfg)  # an input another command makes: one line naming it
        cfg_path = args.model_config
        if cfg_path and os.path.isdir(cfg_path):
            cfg_path = os.path.join(cfg_path, "config.json")
        print(memory_report(cfg, args.gpus, args.gpu_mem_gib, cfg_path, args.overhead_gib, flash=not args.eager_attention))
    except LlmtrainError as e:
        return report(e)
    return 0
