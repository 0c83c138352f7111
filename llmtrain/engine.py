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
from typing import Any

import torch

from .config import Config, ConfigError

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
    return p


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
    for key in ("bf16", "fp16"):
        block = ds.get(key)
        if isinstance(block, dict) and block.get("enabled") not in (None, "auto", precision == key):
            raise ConfigError(
                f"{path}: {key}.enabled={block['enabled']} disagrees with train.precision={precision}; "
                f"remove the '{key}' block (precision comes from train.precision)"
            )
    ds.update(ours)
    ds["train_batch_size"] = global_batch
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16"}
    if precision == "fp16":
        ds["fp16"].update(loss_scale=0, initial_scale_power=16)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as is standard for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def initialize(model: torch.nn.Module, cfg: Config, ds_config: dict):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    t = cfg.train
    schedule = _Schedule(max_steps=t.max_steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                         min_lr_ratio=t.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    return engine, scheduler
