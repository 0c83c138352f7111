"""The one training loop shared by every task: steps, accumulation, eval, logging, checkpoints.

It knows no task: the objective gives each micro-batch's loss share and the eval row, the engine
adapter (engine.py) does backward and step with DeepSpeed's quirks, the data plans the steps.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import distributed as dist
from ..data.protocol import to_device
from ..distributed.mesh import replica_count
from ..errors import LlmtrainError
from .flops import flops_per_token, peak_flops, throughput_columns
from .metrics import Throughput
from .signals import Preempted, StopFlag


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # real (non-padding) tokens trained on, all ranks
    skipped_steps: int = 0  # non-finite steps skipped so far
    consecutive_skips: int = 0  # non-finite steps in a row (the abort counter)
    extra: dict = field(default_factory=dict)


class NonFiniteError(LlmtrainError, RuntimeError):
    """Too many consecutive non-finite steps: every rank raises it at the same step (exit status 4)."""

    exit_code = 4


def _inject_fault(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Test hook: LLMTRAIN_FAULT_NAN_STEP=s[,s...] (and LLMTRAIN_FAULT_RANK=r) turn one rank's loss NaN."""
    steps = os.environ.get("LLMTRAIN_FAULT_NAN_STEP")
    if steps and step in {int(x) for x in steps.split(",")} and rank == int(os.environ.get("LLMTRAIN_FAULT_RANK", "0")):
        return loss * float("nan")
    return loss


class Prefetcher:
    """Plans and collates the next steps' batches in a background thread while the current step
    computes (on CUDA into pinned memory, so the copy to the GPU is asynchronous too).

    The data objects advance their position when a step is planned, i.e. ahead of training; each
    item therefore carries the data state *after its own step*, which is what a checkpoint saves.
    """

    def __init__(self, data, steps: int, pin: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._work, args=(data, steps, pin), daemon=True)
        self.thread.start()

    def _work(self, data, steps: int, pin: bool) -> None:
        try:
            for _ in range(steps):
                plan = data.next_step()
                state = data.state_dict()
                batches = data.batches(plan)
                if pin:
                    batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
                self.queue.put((plan, batches, state))
        except BaseException as e:  # handed to the training thread, which raises it
            self.queue.put(e)

    def next(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Inline:
    """The Prefetcher's interface without the thread, for data whose planning runs the model
    (RL rollouts generate with the engine: ZeRO-3 collectives on a second thread would interleave
    with training's)."""

    def __init__(self, data):
        self.data = data

    def next(self):
        plan = self.data.next_step()
        return plan, self.data.batches(plan), self.data.state_dict()


def train_loop(run) -> RunState:
    """`run` (runner.Run) carries the train settings, info, engine adapter, objective, data, logger
    and the resumed RunState."""
    t, info, adapter, objective, data, logger = run.train, run.info, run.adapter, run.objective, run.data, run.logger
    engine = adapter.engine
    state: RunState = run.state
    eval_set = data.eval_set()
    throughput = Throughput()
    # tflops_per_gpu / mfu columns: FLOPs per token counted once (ZeRO-3 shards via ds_numel)
    model_flops_per_token = getattr(run, "model_flops_per_token", None) or flops_per_token(engine.module, run.seq_len)
    peak = peak_flops(info.device)
    stop = StopFlag()
    start_time, start_step = time.perf_counter(), state.step
    engine.train()

    if getattr(data, "prefetch_safe", True):
        prefetch = Prefetcher(data, t.max_steps - state.step, pin=info.device.type == "cuda")
    else:
        prefetch = Inline(data)
    while state.step < t.max_steps:
        plan, batches, run.data_state = prefetch.next()
        lr_used = adapter.lr()  # the LR this step applies: the scheduler moves it on inside engine.step()
        # --- forward/backward ---
        loss_sum = torch.zeros((), device=info.device, dtype=torch.float32)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            loss, sums = objective.loss(engine, to_device(batch, info.device), plan.global_weight)
            loss = _inject_fault(loss, state.step + 1, info.rank)
            adapter.backward(loss)
            # --- optimizer step --- (DeepSpeed steps the optimizer and LR at the accumulation boundary)
            adapter.step(boundary=i == len(batches) - 1)
            loss_sum += loss.detach().float()
            for k, v in sums.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().double()
        state.step += 1
        # --- non-finite steps --- (the update was skipped on every rank: see EngineAdapter.step)
        if adapter.step_skipped():
            state.skipped_steps += 1
            state.consecutive_skips += 1
            logger.log({"step": state.step, "skipped": True, "skipped_steps": state.skipped_steps})
            logger.message(f"step {state.step}: non-finite loss or gradient on some rank; update skipped "
                           f"({state.consecutive_skips} in a row, limit train.max_skipped_steps={t.max_skipped_steps})")
            if state.consecutive_skips >= t.max_skipped_steps:
                raise NonFiniteError(f"{state.consecutive_skips} consecutive steps had non-finite losses or gradients "
                                     f"(up to step {state.step}); lower train.lr, check the data, or raise train.max_skipped_steps")
        else:
            state.consecutive_skips = 0
        state.tokens_seen += plan.global_tokens
        throughput.add(plan.global_tokens)

        # --- logging --- (.item() syncs the device: only on log steps)
        last = state.step == t.max_steps
        if state.step % t.log_every == 0 or last:
            names = sorted(metric_sums)
            packed = torch.stack([loss_sum.double()] + [metric_sums[k] for k in names])
            # TP ranks each hold the whole loss: count it once (SP ranks hold disjoint shares)
            packed = (dist.all_reduce_sum(packed) / replica_count()).tolist()
            row = {
                "step": state.step,
                "loss": packed[0],
                "lr": lr_used,
                "grad_norm": adapter.grad_norm(),
                "tokens_per_sec": throughput.rate(),
                "tokens_seen": state.tokens_seen,
                "epoch": plan.epoch,
                "elapsed_sec": time.perf_counter() - start_time,
            }
            if run.precision == "fp16":
                row["loss_scale"] = adapter.loss_scale()  # after this step's update (halved on an overflow)
            row.update(throughput_columns(row["tokens_per_sec"], info.world_size, model_flops_per_token, peak))
            row.update({k: v / max(plan.global_weight, 1) for k, v in zip(names, packed[1:])})
            row.update(plan.metrics)
            if not math.isfinite(row["loss"]):
                dist.warn(f"step {state.step}: non-finite loss {row['loss']}")
            logger.log(row)
            logger.progress(state.step, row)
        else:
            logger.progress(state.step)

        # --- eval ---
        if eval_set is not None and ((t.eval_every and state.step % t.eval_every == 0) or last):
            row = {"step": state.step, **objective.evaluate(engine, eval_set, info.device)}
            logger.log(row)
            logger.message(f"step {state.step}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))

        # --- checkpoint ---
        preempted = stop.agreed()
        if (t.save_every and state.step % t.save_every == 0) or last or preempted:
            run.save_checkpoint()
        if preempted and not last:
            raise Preempted(f"signal {stop.received}: checkpointed at step {state.step}")

    elapsed = time.perf_counter() - start_time
    logger.message(f"trained {state.step - start_step} steps in {elapsed:.1f}s")
    return state
