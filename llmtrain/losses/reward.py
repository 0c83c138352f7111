"""Reward-model losses on scalar rewards of (chosen, rejected) pairs, and the read-out of one reward
per sequence from a per-position score (padded or packed rows)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .preference import _reduce
from .token_logps import Metrics


def last_token_values(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """The value at the last position of every sequence of padded/packed rows: (B, T) -> (num_seqs,).

    seq_index (B, T): the sequence number of each position (collate_sequences), -1 on padding.
    A sequence's last position is the largest flat index carrying its number, so right padding,
    packed rows and pad == eos all read the right token (HF's pooling reads the rightmost non-pad
    token of a row: one value per row, the wrong one when a sequence ends in the pad id).
    """
    flat_seq = seq_index.reshape(-1)  # (B, T) -> (B*T,)
    positions = torch.arange(flat_seq.numel(), device=flat_seq.device)
    # padding goes to an extra slot num_seqs that is dropped (num_seqs = 0, a padding batch, works too)
    slot = torch.where(flat_seq >= 0, flat_seq, torch.full_like(flat_seq, num_seqs))
    last = torch.full((num_seqs + 1,), -1, dtype=torch.long, device=flat_seq.device)
    last = last.scatter_reduce(0, slot, positions, reduce="amax")[:num_seqs]  # (num_seqs,) flat index of the end
    return values.reshape(-1)[last]


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    """Detached pair means: accuracy (share of pairs with r_c > r_r strictly: a tie counts as wrong),
    margin r_c - r_r, and the mean chosen and rejected rewards."""
    r_c, r_r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "reward_accuracy": (r_c > r_r).float().mean(),
        "reward_margin": (r_c - r_r).mean(),
        "chosen_reward": r_c.mean(),
        "rejected_reward": r_r.mean(),
    }


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[torch.Tensor] = None,  # (B,) per-pair margin m (Llama 2: larger for clearer preferences)
    center_coef: float = 0.0,  # lambda of the centering term (Eisenstein et al. 2023: 0.01; TRL center_rewards_coefficient)
    reduction: str = "mean",  # "mean" over the B pairs, or "sum" to divide by a global pair count
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss of a scalar reward model (Ouyang et al. 2022, InstructGPT eq. 1),
    with the per-pair margin of Llama 2 (Touvron et al. 2023, eq. 2) and reward centering
    (Eisenstein et al. 2023, "Helping or Herding?"):

    ``L = -log sigmoid(r(x, y_c) - r(x, y_r) - m) + lambda * (r(x, y_c) + r(x, y_r))^2``

    Rewards (B,) each, in any dtype (computed in fp32). With a zero reward head every reward is 0
    and L = ln 2 (m = 0, any lambda). The centering term pins the reward's free offset near 0, so a
    policy optimised against it sees rewards on a stable scale. Metrics: ``reward_metrics``.
    """
    r_c, r_r = chosen_rewards.float(), rejected_rewards.float()
    diff = r_c - r_r  # (B,)
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (r_c + r_r) ** 2
    return _reduce(per_pair, reduction), reward_metrics(r_c, r_r)
