"""Parameter counts that stay right under ZeRO-3 (empty local shards) and 4-bit bases."""
from __future__ import annotations

import torch


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), correct under ZeRO-3 where local tensors are empty shards."""
    def numel(p):
        quant = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: two weights per stored byte
        if quant is not None:
            return int(torch.Size(quant.shape).numel())
        return getattr(p, "ds_numel", p.numel())

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
