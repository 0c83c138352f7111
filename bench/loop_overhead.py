"""The training loop's own overhead per step vs a bare `engine(...)/backward/step` loop.

Same process, same DeepSpeed engine, same model, same batches (the data position is saved and
restored, so both loops see identical micro-batches):

  bare      batches collated up front and already on the device; per micro-batch:
            loss = task.loss(engine, batch, weight); engine.backward(loss * scale); engine.step()
  llmtrain  llmtrain.loop.train_loop: batch planning and collation, host->device copies, the
            preemption-flag all-reduce, ZeRO-0's non-finite check, throughput bookkeeping and
            (every log_every steps) the synced metrics row; checkpoint saving is switched off
            (it is not per-step work) and no eval runs.

Blocks of --block steps alternate (bare, llmtrain, bare, ...) --rounds times; the table reports
the median seconds per step of each and the overhead = llmtrain / bare - 1 (goal: <= 5%).

  python bench/loop_overhead.py                                   # debug SFT recipe, CPU
  python bench/loop_overhead.py --recipe recipes/debug/sft.yaml train.micro_batch_size=4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=os.path.join(REPO, "recipes/debug/sft.yaml"))
    p.add_argument("--block", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="(bare, llmtrain) block pairs")
    p.add_argument("--log-every", type=int, nargs="+", default=[10, 1], help="train.log_every values to measure")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    return p.parse_args(argv)


def bare_block(run, steps: int) -> float:
    """Seconds per step of the bare loop over the next `steps` steps (data position restored after)."""
    from llmtrain.data.protocol import to_device

    engine, objective, info, t = run.engine, run.objective, run.info, run.cfg.train
    saved = run.data.state_dict()
    work = []
    for _ in range(steps):
        plan = run.data.next_step()
        work.append((plan.global_weight, [to_device(b, info.device) for b in run.data.batches(plan)]))
    run.data.load_state_dict(saved)  # the llmtrain block that follows sees the same batches
    scale = t.grad_accum * info.world_size
    start = time.perf_counter()
    for weight, batches in work:
        for batch in batches:
            loss, _ = objective.loss(engine, batch, weight)
            engine.backward(loss * scale)
            engine.step()
    _sync(info.device)
    return (time.perf_counter() - start) / steps


def loop_block(run, steps: int, log_every: int) -> float:
    from llmtrain.train.loop import train_loop

    run.cfg.train.max_steps = run.state.step + steps
    run.cfg.train.log_every = log_every
    start = time.perf_counter()
    train_loop(run)
    _sync(run.info.device)
    return (time.perf_counter() - start) / steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    from llmtrain import distributed as dist
    from llmtrain.config import load_config
    from llmtrain.train.metrics import NullLogger
    from llmtrain.objectives import OBJECTIVES
    from llmtrain.train.runner import setup

    out = tempfile.mkdtemp(prefix="bench-loop-")
    cfg = load_config(args.recipe, [*args.overrides, f"output_dir={out}", "train.resume=never", "train.eval_every=0",
                                    "logging.progress=false", "train.max_steps=100000", "data.eval=[]"])
    run = setup(cfg, OBJECTIVES["sft"].from_config(cfg))
    run.save_checkpoint = lambda: None  # checkpoints are not per-step work
    run.logger.close()
    run.logger = NullLogger()  # rows are still built (and synced) on log steps; only the file write is skipped
    t = cfg.train
    print(f"recipe={args.recipe} device={run.info.device.type} ranks={run.info.world_size} "
          f"micro_batch_size={t.micro_batch_size} grad_accum={t.grad_accum} max_seq_len={cfg.data.max_seq_len} "
          f"packing={cfg.data.packing} block={args.block} steps x {args.rounds} rounds")
    bare_block(run, 3)  # warmup: allocator, first-step costs
    loop_block(run, 3, 10)
    rows = []
    for log_every in args.log_every:
        bare, loop = [], []
        for _ in range(args.rounds):
            bare.append(bare_block(run, args.block))
            loop.append(loop_block(run, args.block, log_every))
        b, l_ = statistics.median(bare), statistics.median(loop)
        rows.append((log_every, b, l_))
    print("| train.log_every | bare s/step | llmtrain loop s/step | loop overhead |")
    print("| --- | --- | --- | --- |")
    for log_every, b, l_ in rows:
        print(f"| {log_every} | {b * 1000:.1f} ms | {l_ * 1000:.1f} ms | {(l_ / b - 1) * 100:+.1f}% |")
    dist.shutdown()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
