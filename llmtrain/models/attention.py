"""Which attention kernel a model runs: sdpa on CPU, flash-attn on CUDA when installed (or its CPU reference)."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import flash_reference


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto: flash_attention_2 on CUDA when flash-attn is installed and the weights are bf16/fp16,
    else sdpa (the CPU path). The flash-attn kernels take only fp16/bf16 inputs: with fp32 weights
    transformers hands them fp32 and the kernel fails on the first forward, so that choice is a
    config error here instead.

    Test hook: LLMTRAIN_FLASH_REFERENCE=1 lets an explicit flash_attention_2 run where the kernel
    is missing (a CPU) on the pure-PyTorch kernels of `llmtrain.flash_reference`; everything else
    on the flash path (transformers' flash wrapper, our varlen kwargs) runs for real.
    """
    half = dtype in (torch.bfloat16, torch.float16)
    if requested == "auto":
        return "flash_attention_2" if half and flash_reference.real_kernel_available(device) else "sdpa"
    if requested == "flash_attention_2":
        if not flash_reference.real_kernel_available(device):
            if not flash_reference.install_if_requested(device):
                raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and "
                                  "`pip install flash-attn`; use auto or sdpa")
            from ..distributed import print0

            print0(f"attention: flash_attention_2 on the pure-PyTorch reference kernels "
                        f"({flash_reference.ENV_SWITCH}=1; slow, for tests and debugging)")
        if not half:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs train.precision=bf16 or fp16 "
                              "(the flash-attn kernels take no fp32); use sdpa for fp32")
    return requested
