"""DeepSpeed: fill the JSON config from the recipe, initialise the engine, LR schedule.

`ds_configs/*.json` hold only ZeRO, offload and communication settings. Batch size,
accumulation, clipping, precision, optimizer and schedule come from the recipe; a JSON that
sets one of them to a different value is an error (a silent choice between two sources of
truth is how runs end up with the wrong global batch).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch

from .config import Config, ConfigError, TrainConfig

# keys llmtrain writes; "auto" in the JSON (Hugging Face Trainer convention) means "fill it in"
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.max_grad_norm",
}


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda" and not _accelerator_supports_fp16():
        # DeepSpeed would stop in engine._do_sanity_check with a traceback
        raise ConfigError(f"{cfg.where('train.precision')}: train.precision=fp16 is not supported on this "
                          f"{device.type} device (DeepSpeed's accelerator reports no fp16 support); use "
                          "train.precision=bf16 or fp32 here (fp16 is for CUDA GPUs without bf16, e.g. V100, T4)")
    return p


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _accelerator_supports_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def _merge_precision_blocks(ds: dict, precision: str, path: str) -> None:
    """`bf16`/`fp16` blocks: `enabled` comes from train.precision; every other key the JSON sets
    (loss_scale_window, initial_scale_power, hysteresis, min_loss_scale, ...) is kept. Only an
    `enabled` that contradicts train.precision is an error."""
    for key in ("bf16", "fp16"):
        block = ds.get(key)
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: '{key}' must be a JSON object like {{\"enabled\": true}}")
        if block.get("enabled") not in (None, "auto", precision == key):
            raise ConfigError(
                f"{path}: {key}.enabled={block['enabled']} disagrees with train.precision={precision}; "
                f"remove {key}.enabled (precision comes from train.precision)"
            )
        ds[key] = {**block, "enabled": precision == key}
    if precision == "fp16":
        # dynamic loss scaling starting at 2^16, unless the JSON chose otherwise
        ds["fp16"].setdefault("loss_scale", 0)
        ds["fp16"].setdefault("initial_scale_power", 16)


def _grad_accum_dtype(ds: dict, cfg: Config, precision: str, stage: int, path: str) -> None:
    """bf16 gradients summed over micro-batches in bf16 lose low bits (8-bit mantissa), more with
    every accumulation step. DeepSpeed 0.19.8 accumulates in the model dtype unless
    data_types.grad_accum_dtype says fp32. We make fp32 the default under ZeRO-2/3 when
    train.grad_accum > 1: the accumulation buffer there is the rank's gradient partition
    (+4 bytes per parameter / ranks). ZeRO-1 keeps bf16 unless the JSON asks (DeepSpeed then
    switches to its BF16_Optimizer, with an unpartitioned fp32 gradient copy: +4 bytes per
    parameter on every rank); ZeRO-0 cannot (DeepSpeed raises NotImplementedError)."""
    data_types = ds.get("data_types") or {}
    asked = data_types.get("grad_accum_dtype")
    if precision != "bf16":
        return
    if asked in ("fp32", "float32", "float") and stage == 0:
        raise ConfigError(f"{path}: data_types.grad_accum_dtype={asked} with bf16 is not supported by DeepSpeed under "
                          "ZeRO-0; use ds_configs/zero1.json or zero2.json, or remove data_types.grad_accum_dtype")
    if asked is None and stage >= 2 and cfg.train.grad_accum > 1:
        ds["data_types"] = {**data_types, "grad_accum_dtype": "fp32"}


def load_ds_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed.config: {path} not found; pick one of ds_configs/*.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return data


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b))


def build_ds_config(cfg: Config, world_size: int, device: torch.device) -> dict:
    """The JSON's ZeRO/offload settings + everything the recipe decides."""
    path = cfg.deepspeed.config
    ds = load_ds_json(path)
    t = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in ours.items():
        if key in ds and ds[key] != "auto" and not _same(ds[key], value):
            raise ConfigError(
                f"{path}: {key}={ds[key]} disagrees with {_OWNED[key]}={value} ({cfg.where(_OWNED[key])}); "
                f"remove {key} from the JSON: llmtrain writes it from the recipe"
            )
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] != "auto" and ds["train_batch_size"] != global_batch:
        raise ConfigError(
            f"{path}: train_batch_size={ds['train_batch_size']} disagrees with train.micro_batch_size x "
            f"train.grad_accum x world size = {global_batch}; remove train_batch_size from the JSON"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the '{key}' block; llmtrain sets AdamW and the LR schedule from train.*")
    precision = resolve_precision(cfg, device)
    _merge_precision_blocks(ds, precision, path)
    ds.update(ours)
    ds["train_batch_size"] = global_batch
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if precision == "fp16" and int(zero.get("stage", 0)) == 0:
        # DeepSpeed 0.19.8's engine.backward scales the loss only for its ZeRO optimizers: under
        # ZeRO-0 its fp16 optimizer then divides unscaled gradients by the loss scale (updates
        # ~65536x too small, clipping never triggers, overflows go unseen); upstream:
        # deepspeedai/DeepSpeed#8393. tests/scripts/ds_zero0_fp16_probe.py notices a fix.
        raise ConfigError(f"{path}: train.precision=fp16 under ZeRO-0 does not train correctly with DeepSpeed "
                          f"{_ds_version()} (its engine.backward skips the fp16 loss scale there); use "
                          "ds_configs/zero1.json (the same memory on one GPU) or train.precision=bf16")
    _grad_accum_dtype(ds, cfg, precision, int(zero.get("stage", 0)), path)
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": t.lr,
            "betas": [t.adam_beta1, t.adam_beta2],
            "eps": t.adam_eps,
            "weight_decay": t.weight_decay,
            # CPU without offload: torch's AdamW (DeepSpeed's fused Adam is a CUDA kernel);
            # with offload DeepSpeed picks its CPU Adam, on GPU its fused Adam
            "torch_adam": device.type == "cpu" and not offload,
        },
    }
    if zero.get("stage", 0) == 3:
        # final/ export gathers the partitioned weights into one 16-bit state dict
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # progress comes from our own logger
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


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


def initialize(model: torch.nn.Module, cfg: Config, ds_config: dict):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from . import dist

    t = cfg.train
    schedule = _schedule(t)
    groups = param_groups(model, t.weight_decay)
    dist.print0(f"optimizer: AdamW lr {t.lr:g}, {describe_groups(groups, t.weight_decay)}")
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    return engine, scheduler


def _schedule(t: TrainConfig) -> _Schedule:
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
    new = _schedule(t)
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


def _note(changes: list[str], key: str, old: float, new: float) -> None:
    if not math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0):
        changes.append(f"{key} {_fmt(float(old))} -> {_fmt(float(new))}")


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
