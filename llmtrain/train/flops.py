"""Model FLOPs per token, peak accelerator FLOP/s, and MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s per GPU / peak dense bf16 FLOP/s of that GPU, where the achieved
FLOP/s count only the model's own math (6N + attention, below): recomputation from gradient
checkpointing, padding and communication are overhead, not useful work, so they lower MFU.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s from the vendors' datasheets, matched
# against torch.cuda.get_device_name() by substring, first match wins (so "H100 PCIe" and
# "H100 NVL" precede the plain "H100", which is the SXM part).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (also "H100 80GB HBM3")
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("A6000", 155e12),  # RTX A6000 (Ampere)
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),  # with fp32 accumulation, as used in training
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters that do matmul work per token: all of the model's (unique) parameters except
    those of `nn.Embedding` modules (token and learned position embeddings are lookups).

    An untied `lm_head` counts (its (hidden x vocab) matmul is real compute); a tied head shares
    the embedding tensor and is therefore not counted (the Kaplan/PaLM convention, which
    underestimates small tied models a little). Under ZeRO-3 a parameter's local tensor is an
    empty shard, so its full size is read from `ds_numel`.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    get_emb = getattr(model, "get_input_embeddings", None)
    if get_emb is not None and get_emb() is not None:
        embedding_ids |= {id(p) for p in get_emb().parameters()}
    # model.parameters() yields a shared (tied) tensor once
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in embedding_ids)


def flops_per_token_formula(non_embedding_params: int, num_layers: int, hidden_size: int, seq_len: int) -> int:
    """Training FLOPs per token, PaLM (Chowdhery et al. 2022, appendix B) / torchtitan convention:

        6 * N  +  12 * L * H * T

    N non-embedding parameters (forward 2N + backward 4N multiply-adds counted as 2 FLOPs each),
    L layers, H hidden size, T sequence length: the attention score and value matmuls
    (QK^T and AV, 2 * 2 * T * H per layer forward, x3 with backward). Causal masking's halving
    is not taken (convention), and T is the row length even when packed documents are shorter.
    """
    return 6 * int(non_embedding_params) + 12 * int(num_layers) * int(hidden_size) * int(seq_len)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> Optional[int]:
    """`flops_per_token_formula` for a Hugging Face causal LM (its `config` gives L and H);
    None when the config names neither (the FLOP columns are then left out of the logs)."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    hidden_size = getattr(config, "hidden_size", None)
    if num_layers is None or hidden_size is None:
        text_config = getattr(config, "text_config", None) or getattr(config, "get_text_config", lambda: None)()
        num_layers = getattr(text_config, "num_hidden_layers", num_layers)
        hidden_size = getattr(text_config, "hidden_size", hidden_size)
    if num_layers is None or hidden_size is None:
        return None
    return flops_per_token_formula(non_embedding_parameters(model), num_layers, hidden_size, seq_len)


def peak_flops(device: torch.device | str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of `device` from `PEAK_BF16_FLOPS`; None on CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(device_name: str) -> Optional[float]:
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def throughput_columns(tokens_per_sec: float, world_size: int, model_flops_per_token: Optional[int],
                       peak: Optional[float]) -> dict:
    """Log columns: `tflops_per_gpu` (achieved model TFLOP/s per rank) and `mfu` (0-1; omitted
    when the peak is unknown, e.g. CPU). MFU = tokens/s per GPU * FLOPs per token / peak."""
    if not model_flops_per_token:
        return {}
    flops_per_gpu = tokens_per_sec / max(world_size, 1) * model_flops_per_token
    row = {"tflops_per_gpu": flops_per_gpu / 1e12}
    if peak:
        row["mfu"] = flops_per_gpu / peak
    return row
