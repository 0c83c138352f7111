"""Stand-in for `liger_kernel.transformers._apply_liger_kernel_to_instance`.

Liger patches a model *instance*: every RMSNorm's forward and every gated MLP's forward are
replaced by fused Triton kernels (and RoPE by a module-level function). Here they are replaced
by the same math in plain PyTorch, counting their calls, so a test sees that the patched modules
really run and that the loss is unchanged. RoPE is left alone: Liger patches it module-wide,
which would leak into other tests.
"""
from __future__ import annotations

import types

import torch

calls: list[dict] = []  # one entry per _apply_liger_kernel_to_instance call: the model and the kwargs
runs = {"rms_norm": 0, "swiglu": 0}


def _rms_norm_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    runs["rms_norm"] += 1
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden.dtype)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    runs["swiglu"] += 1
    return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _apply_liger_kernel_to_instance(model, **kwargs) -> None:
    if not hasattr(model, "config") or type(model).__name__.startswith("Peft"):
        raise TypeError(f"liger stand-in: expected a transformers PreTrainedModel, got {type(model).__name__}")
    calls.append({"model": model, **kwargs})
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_swiglu_forward, module)
