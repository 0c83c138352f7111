"""AdamW parameter groups and the LR schedule, and re-applying the recipe's settings after a resume."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..config import TrainConfig


def lr_multiplier(step: int, *, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR / peak LR for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant.

    Warmup reaches the peak at step `warmup_steps - 1` ((step+1)/warmup, so step 0 already
    trains); the decay runs from the peak to `min_lr_ratio * peak` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)  # linear


class _Schedule:
    """Picklable LR lambda (LambdaLR saves callable objects in its state_dict)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, **self.kw)


def real_ndim(p: torch.Tensor) -> int:
    """A ZeRO-3 partitioned parameter is an empty 1-D tensor; its real shape is `ds_shape`."""
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


DECAY, NO_DECAY = "decay", "no_decay"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and embeddings, none on biases and norm
    weights, as Hugging Face Trainer, nanoGPT and Megatron do. The split is on the parameter's
    real shape (rank >= 2 decays), so it is the same under every ZeRO stage. Each group carries
    its kind under "llmtrain_group" (kept in checkpoints) so a resume can re-apply train.weight_decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if real_ndim(p) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "llmtrain_group": DECAY},
              {"params": no_decay, "weight_decay": 0.0, "llmtrain_group": NO_DECAY}]
    return [g for g in groups if g["params"]]


def describe_groups(groups: list[dict], weight_decay: float) -> str:
    """'weight decay 0.1 on 14 tensors (1,234 params); none on 9 (biases, norms)' for the startup log."""
    def count(g):
        return len(g["params"]), sum(getattr(p, "ds_numel", p.numel()) for p in g["params"])

    by_kind = {g["llmtrain_group"]: count(g) for g in groups}
    d, n = by_kind.get(DECAY, (0, 0)), by_kind.get(NO_DECAY, (0, 0))
    return (f"weight decay {weight_decay:g} on {d[0]} tensors ({d[1]:,} params: matrices, embeddings); "
            f"none on {n[0]} ({n[1]:,} params: biases, norms)")


def schedule_for(t: TrainConfig) -> _Schedule:
    return _Schedule(max_steps=t.max_steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                     min_lr_ratio=t.min_lr_ratio)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(list(v) if isinstance(v, tuple) else v)


def apply_train_settings(engine, t: TrainConfig) -> list[str]:
    """After a resume: the recipe's schedule and optimizer settings apply from the resumed step.

    DeepSpeed's load_checkpoint restores the LR scheduler (LambdaLR.load_state_dict brings back
    base_lrs and the schedule object's max_steps/warmup/...) and the optimizer's param groups
    (lr, weight_decay, betas, eps) as they were saved, so without this a raised train.max_steps
    or a lowered train.lr would be ignored. Returns 'train.key old -> new' for each change.
    """
    scheduler = engine.lr_scheduler
    optimizer = scheduler.optimizer  # the basic optimizer DeepSpeed steps (its groups hold the hyperparameters)
    new = schedule_for(t)
    old_kw = dict(getattr(scheduler.lr_lambdas[0], "kw", {}))
    changes = [f"train.{k} {_fmt(old_kw[k])} -> {_fmt(v)}" for k, v in new.kw.items() if k in old_kw and old_kw[k] != v]
    _note(changes, "train.lr", scheduler.base_lrs[0], t.lr)
    groups = optimizer.param_groups
    # checkpoints from before groups were tagged: [decay, no_decay] in that order (either may be absent)
    kinds = [g.get("llmtrain_group", DECAY if g["weight_decay"] > 0 or (i == 0 and len(groups) > 1) else NO_DECAY)
             for i, g in enumerate(groups)]
    if DECAY in kinds:
        _note(changes, "train.weight_decay", groups[kinds.index(DECAY)]["weight_decay"], t.weight_decay)
    _note(changes, "train.adam_beta1", groups[0]["betas"][0], t.adam_beta1)
    _note(changes, "train.adam_beta2", groups[0]["betas"][1], t.adam_beta2)
    _note(changes, "train.adam_eps", groups[0]["eps"], t.adam_eps)
    scheduler.lr_lambdas = [new for _ in groups]
    scheduler.base_lrs = [t.lr for _ in groups]
    step = scheduler.last_epoch  # LambdaLR stepped once per optimizer step: the next step's index
    for g, kind in zip(groups, kinds):
        g["initial_lr"] = t.lr
        g["lr"] = t.lr * new(step)
        g["betas"] = (t.adam_beta1, t.adam_beta2)
        g["eps"] = t.adam_eps
        g["weight_decay"] = t.weight_decay if kind == DECAY else 0.0
    scheduler._last_lr = [g["lr"] for g in groups]
    return changes


def group_settings(engine) -> list[dict]:
    """Per param group: its llmtrain tag, which a ZeRO-3 universal load overwrites (repair_zero3_universal_load)."""
    return [{"llmtrain_group": g["llmtrain_group"]} for g in _basic_optimizer(engine).param_groups if "llmtrain_group" in g]


def repair_zero3_universal_load(engine, settings: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), found because PPO's resumed policy
    and critic drifted from the uninterrupted run by ~4% of an update per step:
    1. it hands every sub-group the *same* `step` tensor, which torch's AdamW (CPU, no offload) increments
       in place once per group per step: with llmtrain's two groups (decay, no decay) the bias correction
       ran one step ahead per step. Each group gets its own copy (FusedAdam and DeepSpeedCPUAdam keep an
       int step: nothing shared there).
    2. it copies group 0's hyperparameters onto every group, so the no-decay group (norms, biases) got
       the decay group's tag and weight_decay. The tags (group_settings before the load) go back and the
       no-decay group's decay back to 0, its value in every llmtrain checkpoint; the decay group keeps the
       checkpoint's value, so apply_train_settings reports a changed train.weight_decay as after any resume."""
    basic = _basic_optimizer(engine)
    for state in basic.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if len(settings) != len(basic.param_groups):
        return  # untagged groups (not built by param_groups): nothing known to put back
    for group, before in zip(basic.param_groups, settings):
        group.update(before)
        if before["llmtrain_group"] == NO_DECAY:
            group["weight_decay"] = 0.0


def _basic_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW


def _note(changes: list[str], key: str, old: float, new: float) -> None:
    if not math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0):
        changes.append(f"{key} {_fmt(float(old))} -> {_fmt(float(new))}")
