"""The DeepSpeed engine as the loop drives it. Every DeepSpeed quirk the loop would otherwise carry
lives here: the backward re-scaling, ZeRO-0's missing non-finite check, the no-update step.

`ds_config.py` builds the engine's config from the recipe, `optim.py` its parameter groups and LR
schedule; `initialize` puts them together and returns an `EngineAdapter`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import distributed as dist
from ..config import TrainConfig
from .optim import describe_groups, param_groups, schedule_for


def backward_scale(grad_accum: int, data_parallel_size: int, sp_size: int = 1, stage: int = 0) -> int:
    """What undoes DeepSpeed's own normalisation of a micro-batch loss that is already its share of
    the global-batch mean: engine.backward divides the loss by gradient_accumulation_steps, and the
    gradient reduction averages over the data-parallel ranks.

    Ulysses SP: gradients are summed over the DP x SP group and divided by world / SP = DP
    (engine.py:3883, stage_1_and_2.py:1506, stage3.py:1878): the SP ranks' shares add up, as they
    should (each holds disjoint tokens). Except ZeRO-3's reduce_scatter path, which divides by the
    whole world (comm/coalesced_collectives.py:124; ds_config pins that path): x SP there.
    AutoTP: averaged over the DP group (world / TP) only."""
    return grad_accum * data_parallel_size * (sp_size if stage == 3 and sp_size > 1 else 1)


class EngineAdapter:
    """The loop's view of the engine: backward of a micro-batch's loss share, a step per micro-batch,
    and whether an optimizer step was skipped. `engine` is the DeepSpeed engine itself (what the
    objectives forward through, and what checkpoints and the export read)."""

    def __init__(self, engine, *, stage: int, grad_scale: int, device: torch.device):
        self.engine, self.stage, self.grad_scale, self.device = engine, stage, grad_scale, device
        self._skipped_before: Optional[int] = None  # engine.skipped_steps when this optimizer step began
        self._own_skip = False  # the ZeRO-0 check skipped this step

    def backward(self, loss_share: torch.Tensor) -> None:
        """loss_share: this micro-batch's share of the step loss (already divided by the step's global
        normaliser); DeepSpeed's 1/grad_accum and its average over ranks are undone here."""
        self.engine.backward(loss_share * self.grad_scale)

    def step(self, boundary: bool) -> None:
        """engine.step() after each micro-batch's backward: DeepSpeed steps the optimizer and the LR
        schedule at the accumulation boundary (the step's last micro-batch). ZeRO-0 (fp32/bf16) has
        no overflow check of its own (fp16 is refused under ZeRO-0, see ds_config.build_ds_config):
        there the boundary checks the reduced gradients first and applies no update if any rank's
        hold inf/NaN. Under ZeRO 1-3 DeepSpeed's optimizer checks the global grad norm itself,
        skips the update and counts it in engine.skipped_steps (every rank sees the same norm)."""
        if self._skipped_before is None:  # the step's first micro-batch (a resume may have restored the counter)
            self._skipped_before = self.engine.skipped_steps
        if boundary and self.stage == 0 and _nonfinite_grads(self.engine, self.device):
            self._own_skip = True
            with _no_update(self.engine):
                self.engine.step()
        else:
            self.engine.step()

    def step_skipped(self) -> bool:
        """Whether the optimizer step that just ended applied no update (non-finite loss or gradient); call once per step."""
        before = self.engine.skipped_steps if self._skipped_before is None else self._skipped_before
        skipped = self._own_skip or self.engine.skipped_steps > before
        self._skipped_before, self._own_skip = None, False
        return skipped

    def lr(self) -> float:
        """The LR the next optimizer step applies (the scheduler moves it on inside engine.step())."""
        return self.engine.get_lr()[0]

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def loss_scale(self) -> Optional[float]:
        return loss_scale(self.engine)


def _nonfinite_grads(engine, device: torch.device) -> bool:
    """True on every rank if any rank's reduced gradients hold inf/NaN. One all-reduce (and one
    sync) per step, ZeRO-0 only."""
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


def initialize(model: torch.nn.Module, t: TrainConfig, ds_config: dict, world_size: int,
               device: torch.device, ds_config_path: str = "the DeepSpeed config", mesh=None,
               mpu=None) -> EngineAdapter:
    """deepspeed.initialize with AdamW groups (optim.param_groups) and the recipe's LR schedule;
    ds_config_path (deepspeed.config) names the JSON in the refusal of an asynchronous checkpoint writer.
    mesh: distributed.mesh.Mesh; mpu: DeepSpeed's SP state (models.sequence_parallel.register)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    schedule = schedule_for(t)
    groups = param_groups(model, t.weight_decay)
    dist.print0(f"optimizer: AdamW lr {t.lr:g}, {describe_groups(groups, t.weight_decay)}")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
        mpu=mpu,
    )
    from .ckpt_engine import check_supported

    check_supported(engine.checkpoint_engine, ds_config_path)  # before training, not at the first save
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    dp, sp = (mesh.dp, mesh.sp) if mesh is not None else (world_size, 1)
    return EngineAdapter(engine, stage=stage, grad_scale=backward_scale(t.grad_accum, dp, sp, stage), device=device)


def accumulation_note(engine, t: TrainConfig, precision: str) -> str:
    """' (gradients accumulated in fp32)' for the startup line: DeepSpeed's own resolution of
    data_types.grad_accum_dtype, shown when bf16 gradients are summed over micro-batches."""
    if precision != "bf16" or t.grad_accum == 1:
        return ""
    dtype = engine.get_data_types()[1]
    return f" (gradients accumulated in {'fp32' if dtype == torch.float32 else 'bf16'})"


def loss_scale(engine) -> Optional[float]:
    """fp16's current dynamic loss scale (None without fp16): ZeRO optimizers expose cur_scale,
    DeepSpeed's ZeRO-0 fp16 optimizers keep it in loss_scale_config."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    if hasattr(opt, "loss_scale_config"):
        return float(opt.loss_scale_config.cur_scale)
    scale = getattr(opt, "cur_scale", None)
    return float(scale) if scale is not None else None
