"""`llmtrain sft|dpo|reward|pretrain` (= launch/<task>.py) under every launcher: parse, build the objective, run.

Exit status (errors.py): 0 done (final/ complete), 2 user error, 3 preempted (checkpointed), 4 too
many non-finite steps, 5 storage (a checkpoint or final/ could not be written).
"""
from __future__ import annotations

from typing import Optional

from .. import distributed as dist
from ..config import load_config
from ..distributed.waiting import OtherRankFailed
from ..errors import LlmtrainError
from ..objectives import OBJECTIVES
from ..train.runner import run_task
from ..train.signals import Preempted, requeue_slurm_job
from .common import add_overrides, recipe_parser, report


def main(task: str, argv: Optional[list[str]] = None) -> int:
    """Run the task `task` (a key of objectives.OBJECTIVES); return the exit status."""
    p = recipe_parser(f"llmtrain {task}: train with a recipe under any launcher (python, deepspeed, torchrun, "
                      "mpirun, srun)")
    add_overrides(p)
    args = p.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        run_task(cfg, OBJECTIVES[task].from_config(cfg))
        code = 0
    except Preempted as e:
        dist.print0(f"stopped: {e}; resume with train.resume=auto")
        if cfg.train.requeue_on_signal and dist.is_main():
            requeue_slurm_job()
        code = e.exit_code
    except OtherRankFailed as e:  # the working rank printed its line; this rank ends with the same status
        code = e.exit_code
    except LlmtrainError as e:
        code = report(e)
    return dist.finish(code)
