"""`llmtrain preflight` (= launch/preflight.py) on its own, under any launcher: the rank table,
identity checks and an all-reduce probe (distributed/preflight.py).

    python|deepspeed|torchrun|mpirun|srun ... launch/preflight.py --recipe R [key=value ...]
    llmtrain preflight --hostfile H      # can every host of a DeepSpeed hostfile be reached?
Exit status 0: all ranks agree; 2: a rank differs (named) or the launch environment is incomplete.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from .. import distributed as dist
from ..config import load_config
from ..data.tokenizer_id import tokenizer_hash
from ..distributed import preflight
from ..distributed.mesh import build_mesh
from ..errors import LlmtrainError
from ..models.tokenizer import load_tokenizer
from .common import report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="llmtrain preflight: ranks, identity checks, all-reduce bandwidth")
    p.add_argument("--recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--hostfile", help="only check that every host of this DeepSpeed hostfile resolves and answers on ssh")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    if args.hostfile:
        problems = preflight.check_hostfile(args.hostfile)
        for line in problems:
            print(f"error: hostfile {line}", file=sys.stderr, flush=True)
        print(f"preflight: hostfile {args.hostfile}: {'ok' if not problems else f'{len(problems)} problem(s)'}", flush=True)
        return 2 if problems else 0
    if not args.recipe:
        p.error("--recipe is required (or --hostfile)")
    code = 0
    try:
        cfg = load_config(args.recipe, args.overrides)
        info = dist.init(cfg.dist.timeout_minutes, cfg.dist.backend)
        info = dataclasses.replace(info, mesh=build_mesh(cfg.parallel, info.world_size, info.rank))  # dp/sp/tp columns
        preflight.run(cfg, info, tokenizer_hash(load_tokenizer(cfg.model)))
    except LlmtrainError as e:
        code = report(e)
    return dist.finish(code)
