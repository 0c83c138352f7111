"""Optional speed paths, each behind an explicit recipe switch; with every switch off the model is
returned untouched (the CPU path every test runs).

  model.liger: true    Liger Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU) patched into the model
                       instance. CUDA + `pip install liger-kernel` only. Liger's own fused
                       linear-cross-entropy is left off: llmtrain computes token log-probs itself
                       (train.loss_chunk_tokens is the chunked head that never materialises logits).
  model.compile: true  torch.compile of every decoder layer ("regional" compilation): one compiled
                       graph reused by all layers (compile time of one layer, not of the whole
                       model), while the embedding, mask construction, LM head and loss stay eager,
                       so packing's position_ids masks and the chunked head work unchanged. On
                       flash-attn the packed-sample boundaries enter the compiled layers as kwargs
                       (`objectives.lm_forward.model_inputs`); their max lengths are Python ints, which dynamo
                       makes dynamic once they change (a recompile or two, not one per batch).

flash_attention_2 is chosen in `models.attention.choose_attention` (auto: CUDA + flash-attn installed +
bf16/fp16). CPU tests of every switch: tests/unit/test_fastpaths.py (Liger and QLoRA with the CUDA
library stood in for, compile with a stand-in backend) and tests/unit/test_flash_packed.py.
"""
from __future__ import annotations

import importlib.util

import torch

from ..config import ModelConfig
from ..errors import ConfigError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class is in the HF `_no_split_modules`
    list (LlamaDecoderLayer, GPT2Block, ...), found through PEFT wrappers too."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def apply_liger(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if device.type != "cuda":
        raise ConfigError(f"model.liger=true needs a CUDA GPU (this run is on {device.type}); set model.liger=false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.liger=true needs liger-kernel: `pip install liger-kernel`, or set model.liger=false")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    # logits/log-probs stay ours (chunked head): no Liger cross-entropy or fused linear-CE
    _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    return model


def apply_compile(model: torch.nn.Module) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"model.compile=true: no decoder layers found in {type(model).__name__} "
                          "(no _no_split_modules); set model.compile=false")
    for layer in layers:
        layer.compile()  # in place: nn.Module.compile keeps names, state_dict and DeepSpeed's view of params
    return model


def apply_fast_paths(model: torch.nn.Module, m: ModelConfig, device: torch.device) -> torch.nn.Module:
    """Called once, right after the model is loaded and before DeepSpeed wraps it."""
    if m.liger:
        model = apply_liger(model, device)
    if m.compile:
        model = apply_compile(model)
    return model
