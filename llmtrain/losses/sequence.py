"""Summed log-probs per sequence, padded or packed (the inputs of the preference losses)."""
from __future__ import annotations

import torch

from ..data.labels import IGNORE_INDEX


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log pi(y | x) = sum_{t: y_t != IGNORE} logp_t`` per row: (B, T) -> (B,)."""
    target = labels != IGNORE_INDEX
    return torch.where(target, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


def packed_sequence_logps(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
) -> torch.Tensor:
    """``log pi(y_s | x_s)`` for every sample s of packed rows: (B, T) -> (num_seqs,).

    seq_ids (B, T): index in [0, num_seqs) of the sample each position belongs to,
    -1 for padding. Equals ``sequence_logps`` on the same samples unpacked.
    """
    target = (labels != IGNORE_INDEX) & (seq_ids >= 0)
    # (B, T) -> (B*T,) so index_add_ can scatter every position to its sample; non-target positions
    # go to an extra slot num_seqs that is dropped (so num_seqs = 0, a padding batch, works too)
    values = torch.where(target, token_logps, torch.zeros_like(token_logps)).reshape(-1)
    index = torch.where(target, seq_ids, torch.full_like(seq_ids, num_seqs)).reshape(-1)
    out = token_logps.new_zeros(num_seqs + 1)
    return out.index_add(0, index, values)[:num_seqs]
