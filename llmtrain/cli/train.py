"""`llmtrain sft|dpo|reward|pretrain` (= launch/<task>.py) under every launcher: parse, build the objective, run.

Exit status (errors.py): 0 done (final/ complete), 2 user error, 3 preempted (checkpointed), 4 too
many non-finite steps, 5 storage (a checkpoint or final/ could not be written).
"""
from __future__ import annotations

import sys
from typing import Optional

from .. import distributed as dist
from ..config import check_produced_inputs, load_config
from ..distributed.waiting import OtherRankFailed, WaitError
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
        check_produced_inputs(cfg)  # an input another command makes: one line naming it
        run_task(cfg, OBJECTIVES[task].from_config(cfg))
        code = 0
    except WaitError as e:  # raised by every waiting rank; the rank that would print may be the dead one
        if e.speaker:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return dist.finish(e.exit_code, wait_for_peers=False)  # the awaited rank is gone or still busy
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
