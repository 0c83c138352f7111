"""Helper for test_from_scratch_init_is_the_same_under_every_stage: build the run exactly as a
training launch does (runner.setup: model from model.config, ZeRO init, DeepSpeed engine), then
export the untrained weights to OUT (final/-style directory), without a training step.

  [torchrun ...] python tests/scripts/initial_weights.py RECIPE OUT [key=value ...]
"""
import sys


from llmtrain import distributed as dist
from llmtrain.train import export  # noqa: E402
from llmtrain.config import load_config  # noqa: E402
from llmtrain.train.runner import setup  # noqa: E402
from llmtrain.objectives import SFT  # noqa: E402

# spawned data-preparation workers re-import this file: the work runs only in the launched process
if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[3:])
    run = setup(cfg, SFT.from_config(cfg))
    export.export_hf(run.engine, run.tokenizer, sys.argv[2], run.stage)
    run.logger.close()
    dist.finish(0)
