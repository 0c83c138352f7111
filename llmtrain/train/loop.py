"""The one training loop shared by every task: steps, accumulation, eval, logging, checkpoints."""
from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from . import checkpoint, dist
from .engine import loss_scale
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


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: every rank raises it at the same step."""


def _inject_fault(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Test hook: LLMTRAIN_FAULT_NAN_STEP=s[,s...] (and LLMTRAIN_FAULT_RANK=r) turn one rank's loss NaN."""
    steps = os.environ.get("LLMTRAIN_FAULT_NAN_STEP")
    if steps and step in {int(x) for x in steps.split(",")} and rank == int(os.environ.get("LLMTRAIN_FAULT_RANK", "0")):
        return loss * float("nan")
    return loss


def _nonfinite_grads(engine, device: torch.device) -> bool:
    """ZeRO-0 (fp32/bf16) has no overflow check of its own: True on every rank if any rank's
    reduced gradients hold inf/NaN. One all-reduce (and one sync) per step, ZeRO-0 only."""
    flags = [(~torch.isfinite(p.grad)).any() for p in engine.module.parameters() if p.grad is not None]
    bad = torch.stack(flags).sum().float() if flags else torch.zeros((), device=device)
    return bool(dist.all_reduce_sum(bad).item() > 0)


@contextlib.contextmanager
def _no_update(engine):
    """Let engine.step() do its bookkeeping but apply nothing: zeroed gradients, and the optimizer
    and LR scheduler steps skipped (as DeepSpeed's ZeRO 1-3 do on overflow)."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    patched = [engine.optimizer, engine.lr_scheduler]
    for obj in patched:
        obj.step = lambda *a, **k: None  # instance attribute shadows the method for this call
    try:
        yield
    finally:
        for obj in patched:
            del obj.step


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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


def evaluate(run, eval_set) -> dict:
    """Loss (and task metrics) over the whole eval set, all ranks, normalised like training."""
    engine, task = run.engine, run.task
    engine.eval()
    loss_sum = torch.zeros((), device=run.info.device, dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in eval_set.batches:
            loss, batch_sums = task.loss(engine, _to_device(batch, run.info.device), eval_set.global_weight)
            loss_sum += loss.double()
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0) + v.double()
    engine.train()
    names = sorted(sums)
    totals = dist.all_reduce_sum(torch.stack([loss_sum] + [sums[k] for k in names])).tolist()
    out = {"eval_loss": totals[0]}
    out.update({f"eval_{k}": v / max(eval_set.global_weight, 1) for k, v in zip(names, totals[1:])})
    return out


def train_loop(run) -> RunState:
    """`run` carries cfg, info, engine, task, data, logger, tokenizer and the resumed RunState."""
    cfg, info, engine, task, data, logger = run.cfg, run.info, run.engine, run.task, run.data, run.logger
    t = cfg.train
    state: RunState = run.state
    # DeepSpeed divides the loss by grad_accum in backward and averages gradients over ranks;
    # our micro-batch loss is already its share of the global-batch mean, so undo both.
    backward_scale = t.grad_accum * info.world_size
    eval_set = data.eval_set() if (t.eval_every or cfg.data.eval or cfg.data.eval_fraction) else None
    throughput = Throughput()
    # tflops_per_gpu / mfu columns: FLOPs per token counted once (ZeRO-3 shards via ds_numel)
    model_flops_per_token, peak = flops_per_token(engine.module, cfg.data.max_seq_len), peak_flops(info.device)
    stop = StopFlag()
    start_time, start_step = time.perf_counter(), state.step
    engine.train()

    # ZeRO-0 (fp32/bf16) has no overflow check of its own. fp16 is refused under ZeRO-0 (see
    # engine.build_ds_config); under ZeRO 1-3 DeepSpeed's fp16 optimizer checks for inf/NaN, skips
    # the update and lowers the loss scale itself (counted in engine.skipped_steps)
    own_skip_check = run.stage == 0
    prefetch = Prefetcher(data, t.max_steps - state.step, pin=info.device.type == "cuda")
    while state.step < t.max_steps:
        plan, batches, run.data_state = prefetch.next()
        lr_used = engine.get_lr()[0]  # the LR this step applies: the scheduler moves it on inside engine.step()
        # --- forward/backward ---
        loss_sum = torch.zeros((), device=info.device, dtype=torch.float32)
        metric_sums: dict[str, torch.Tensor] = {}
        skipped_before = engine.skipped_steps
        for i, batch in enumerate(batches):
            loss, sums = task.loss(engine, _to_device(batch, info.device), plan.global_weight)
            loss = _inject_fault(loss, state.step + 1, info.rank)
            engine.backward(loss * backward_scale)
            # --- optimizer step --- (DeepSpeed steps the optimizer and LR at the accumulation boundary)
            stage0_skip = own_skip_check and i == len(batches) - 1 and _nonfinite_grads(engine, info.device)
            with _no_update(engine) if stage0_skip else contextlib.nullcontext():
                engine.step()
            loss_sum += loss.detach().float()
            for k, v in sums.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().double()
        state.step += 1
        # --- non-finite steps --- ZeRO 1-3 skip the update themselves when the global grad norm is
        # inf/NaN (every rank sees the same reduced norm, so they skip together); ZeRO-0 via the check above
        if stage0_skip or engine.skipped_steps > skipped_before:
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
            packed = dist.all_reduce_sum(packed).tolist()
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": state.step,
                "loss": packed[0],
                "lr": lr_used,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_sec": throughput.rate(),
                "tokens_seen": state.tokens_seen,
                "epoch": plan.epoch,
                "elapsed_sec": time.perf_counter() - start_time,
            }
            if run.precision == "fp16":
                row["loss_scale"] = loss_scale(engine)  # after this step's update (halved on an overflow)
            row.update(throughput_columns(row["tokens_per_sec"], info.world_size, model_flops_per_token, peak))
            row.update({k: v / max(plan.global_weight, 1) for k, v in zip(names, packed[1:])})
            if not math.isfinite(row["loss"]):
                dist.warn(f"step {state.step}: non-finite loss {row['loss']}")
            logger.log(row)
            logger.progress(state.step, row)
        else:
            logger.progress(state.step)

        # --- eval ---
        if eval_set is not None and ((t.eval_every and state.step % t.eval_every == 0) or last):
            row = {"step": state.step, **evaluate(run, eval_set)}
            if task.name != "dpo":
                row["eval_ppl"] = math.exp(min(row["eval_loss"], 50))
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
