"""The DeepSpeed config of a run: the JSON's ZeRO/offload settings + everything the recipe decides.

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

from ..config import DeepSpeedSection, TrainConfig
from ..errors import ConfigError

# keys llmtrain writes; "auto" in the JSON (Hugging Face Trainer convention) means "fill it in"
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.max_grad_norm",
}


def resolve_precision(t: TrainConfig, device: torch.device) -> str:
    p = t.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda" and not _accelerator_supports_fp16():
        # DeepSpeed would stop in engine._do_sanity_check with a traceback
        raise ConfigError(f"{t.where('train.precision')}: train.precision=fp16 is not supported on this "
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


def _grad_accum_dtype(ds: dict, t: TrainConfig, precision: str, stage: int, path: str) -> None:
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
    if asked is None and stage >= 2 and t.grad_accum > 1:
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


def batch_world_size(world_size: int, mesh=None) -> int:
    """The rank count DeepSpeed's train_batch_size check multiplies by (runtime/config.py:457-472):
    with the Ulysses SP mpu the data-parallel size world / SP; under AutoTP (no mpu passed) every
    rank counts, although gradients are averaged over world / TP only."""
    if mesh is None or mesh.sp == 1:
        return world_size
    return world_size // mesh.sp


def build_ds_config(t: TrainConfig, section: DeepSpeedSection, world_size: int, device: torch.device,
                    mesh=None) -> dict:
    """The JSON's ZeRO/offload settings + everything the recipe decides (+ the SP/TP blocks of `mesh`)."""
    path = section.config
    ds = load_ds_json(path)
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in ours.items():
        if key in ds and ds[key] != "auto" and not _same(ds[key], value):
            raise ConfigError(
                f"{path}: {key}={ds[key]} disagrees with {_OWNED[key]}={value} ({t.where(_OWNED[key])}); "
                f"remove {key} from the JSON: llmtrain writes it from the recipe"
            )
    global_batch = t.micro_batch_size * t.grad_accum * batch_world_size(world_size, mesh)
    if "train_batch_size" in ds and ds["train_batch_size"] != "auto" and ds["train_batch_size"] != global_batch:
        raise ConfigError(
            f"{path}: train_batch_size={ds['train_batch_size']} disagrees with train.micro_batch_size x "
            f"train.grad_accum x world size{' / SP' if mesh is not None and mesh.sp > 1 else ''} = {global_batch}; "
            "remove train_batch_size from the JSON"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the '{key}' block; llmtrain sets AdamW and the LR schedule from train.*")
    precision = resolve_precision(t, device)
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
    _grad_accum_dtype(ds, t, precision, int(zero.get("stage", 0)), path)
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
    if mesh is not None:
        _parallel_blocks(ds, mesh, path)
    ds.setdefault("steps_per_print", 10**9)  # progress comes from our own logger
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _parallel_blocks(ds: dict, mesh, path: str) -> None:
    """Ulysses SP / AutoTP keys. The JSON must not set them: parallel.* is their one source."""
    for key in ("sequence_parallel_size", "tensor_parallel", "data_parallel_size"):
        if key in ds:
            raise ConfigError(f"{path}: remove '{key}'; llmtrain sets it from parallel.*")
    if mesh.sp > 1:
        # read by DeepSpeedConfig when no mpu is passed (the zero.Init / HfDeepSpeedConfig path of
        # ZeRO-3 loading, and DPO's frozen reference): world / SP for the batch check (config.py:466)
        ds["sequence_parallel_size"] = mesh.sp
        zero = ds["zero_optimization"]
        if int(zero.get("stage", 0)) == 3:
            # DeepSpeed 0.19.8 bug: ZeRO-3's reduce_scatter path (stage3.py:1912-1944 ->
            # comm/coalesced_collectives.py:124) averages gradients over the whole DP x SP world, its
            # all-reduce path (stage3.py:1878) over DP. Pin every bucket to reduce_scatter (a parameter
            # larger than reduce_bucket_size takes it anyway, stage3.py:1626/1673) and scale the loss
            # by SP more (engine.backward_scale); tests/integration/test_parallel.py notices a fix
            zero["reduce_scatter"] = True
    if mesh.tp > 1:
        # no "dtype": TPTrainingConfig wants a torch.dtype instance that the config print cannot
        # serialise, and training never reads it (params keep the engine's dtype)
        ds["tensor_parallel"] = {"autotp_size": mesh.tp}


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
