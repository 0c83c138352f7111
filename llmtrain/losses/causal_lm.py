"""The causal LM loss of pretraining and SFT (conventions: losses/__init__.py)."""
from __future__ import annotations

import torch

from ..data.labels import IGNORE_INDEX
from .token_logps import Metrics


def causal_lm_loss(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    num_target_tokens: int | torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level cross entropy normalised by the *global* target-token count.

    ``L = -(1 / N_global) * sum_{t: y_t != IGNORE} log p(y_t | y_<t)``

    token_logps and labels (B, T), aligned. ``num_target_tokens`` is N_global: the number
    of target tokens in the whole optimizer step (all micro-batches, all ranks), so that
    summing this loss over micro-batches and ranks gives the global per-token mean no
    matter how samples were split or padded. (The caller must undo DeepSpeed's division
    by grad-accum steps and its averaging over ranks.) With no target tokens the loss is
    exactly 0 and backward gives zero gradients.

    metrics: ``loss_sum`` (detached sum of -logp over local targets), ``target_tokens``
    (local target count).
    """
    target = labels != IGNORE_INDEX
    # where, not multiply: a NaN/inf at an ignored position must not leak into the sum
    loss_sum = -torch.where(target, token_logps, torch.zeros_like(token_logps)).sum()
    if isinstance(num_target_tokens, torch.Tensor):
        denominator = num_target_tokens.to(loss_sum.dtype).clamp(min=1)
    else:
        denominator = max(int(num_target_tokens), 1)  # 0 targets: 0 / 1 = 0, not NaN
    loss = loss_sum / denominator
    metrics = {"loss_sum": loss_sum.detach(), "target_tokens": target.sum()}
    return loss, metrics
