"""Launcher helper for tests/integration/test_parallel.py: several runs in one process group, one after
the other, so a test pays the launcher's and the imports' start-up once (the suite's time budget).

    torchrun --nproc_per_node 2 tests/scripts/parallel_runs.py TASK RECIPE [key=value ...] -- TASK RECIPE ...

Each run is `llmtrain TASK --recipe RECIPE overrides` (train.runner.run_task, the CLI's own path).
Runs of one process must agree on parallel.sequence_parallel_size (DeepSpeed's Ulysses attention,
once installed, stays installed for the process).
"""
import sys

from llmtrain import distributed as dist
from llmtrain.config import load_config
from llmtrain.errors import LlmtrainError
from llmtrain.objectives import OBJECTIVES
from llmtrain.train.runner import run_task

# spawned data-preparation workers re-import this file: the work runs only in the launched process
if __name__ == "__main__":
    runs, current = [], []
    for arg in sys.argv[1:] + ["--"]:
        if arg == "--":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    code = 0
    for task, recipe, *overrides in [r for r in runs if r]:
        try:
            cfg = load_config(recipe, overrides)
            run_task(cfg, OBJECTIVES[task].from_config(cfg))
            dist.print0(f"RUN_DONE {task} {cfg.output_dir}")
        except LlmtrainError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = 2
            break
    sys.exit(dist.finish(code))
