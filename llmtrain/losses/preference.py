"""Preference losses (the DPO family) on summed sequence log-probs, and their registry.

A variant is another function with its paper's formula; what a loss needs besides the log-probs
(IPO: per-token averaged log-probs) is carried by its registry entry, so the DPO objective never
branches on the loss name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .token_logps import Metrics


_REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mean": torch.mean, "sum": torch.sum}


def _reduce(per_pair_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {sorted(_REDUCTIONS)}")
    return _REDUCTIONS[reduction](per_pair_loss)


def _preference_logits(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
) -> torch.Tensor:
    """``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))``, (B,)."""
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def _reward_metrics(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
) -> Metrics:
    """Implicit rewards ``r = beta * (log pi - log ref)``; all values detached batch means."""
    chosen_reward = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()  # (B,)
    rejected_reward = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()  # (B,)
    return {
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "chosen_reward": chosen_reward.mean(),
        "rejected_reward": rejected_reward.mean(),
        "chosen_logps": policy_chosen_logps.detach().mean(),
        "rejected_logps": policy_rejected_logps.detach().mean(),
    }


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,  # inverse temperature of the implicit reward (DPO paper: 0.1 - 0.5)
    label_smoothing: float = 0.0,  # cDPO: assumed probability that a preference label is flipped
    reduction: str = "mean",  # "mean" over the B pairs, or "sum" to divide by a global pair count
) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023), with conservative label smoothing (cDPO, Mitchell 2023).

    ``h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))``
    ``L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``

    eps = 0 is plain DPO; with policy == reference the loss is ln 2. Inputs (B,) are
    summed sequence log-probs. ``reduction="mean"`` averages over the B pairs given;
    for normalisation over a global batch pass ``"sum"`` and divide by the global pair
    count. Metrics: implicit-reward accuracy, margin and means (see ``_reward_metrics``).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = _preference_logits(*logps)  # h, (B,)
    per_pair = (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
        - label_smoothing * F.logsigmoid(-beta * logits)
    )
    metrics = _reward_metrics(*logps, beta)
    return _reduce(per_pair, reduction), metrics


def dpo_ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,  # IPO's tau: regularisation strength; the target margin is 1 / (2 beta)
    reduction: str = "mean",  # "mean" over the B pairs, or "sum" to divide by a global pair count
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences"), in the TRL form.

    ``h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))``
    ``L = (h - 1 / (2 * beta))^2``

    The log-probs are used as passed. Its registry entry (PREFERENCE_LOSSES["ipo"]) feeds
    *per-token averaged* log-probs (sum / number of target tokens), as TRL does, which keeps h
    on a scale where the 1/(2 beta) target means the same for short and long responses.
    Reduction and metrics as in ``dpo_sigmoid_loss``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = _preference_logits(*logps)  # h, (B,)
    per_pair = (logits - 1.0 / (2.0 * beta)) ** 2
    metrics = _reward_metrics(*logps, beta)
    return _reduce(per_pair, reduction), metrics


def dpo_hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,  # scales h; the margin of the hinge is 1 / beta in units of h
    reduction: str = "mean",  # "mean" over the B pairs, or "sum" to divide by a global pair count
) -> tuple[torch.Tensor, Metrics]:
    """Hinge preference loss from SLiC (Zhao et al. 2023), with the reference
    log-ratio as in DPO (the TRL "hinge" loss).

    ``h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))``
    ``L = max(0, 1 - beta * h)``

    Reduction and metrics as in ``dpo_sigmoid_loss``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = _preference_logits(*logps)  # h, (B,)
    per_pair = torch.relu(1.0 - beta * logits)
    metrics = _reward_metrics(*logps, beta)
    return _reduce(per_pair, reduction), metrics


def chosen_nll_loss(
    policy_chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    reduction: str = "mean",  # "mean" over the B pairs, or "sum" to divide by a global pair count
) -> torch.Tensor:
    """Length-normalised NLL of the chosen response, the extra term of RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", eq. 1; TRL's ``rpo_alpha``):

    ``L_NLL = -log pi(y_w|x) / |y_w|``, added to a preference loss as ``L + alpha * L_NLL``.

    DPO alone only widens the chosen - rejected margin and may lower both log-probs, so the
    greedy answer can get worse while reward accuracy rises; this term keeps y_w likely.
    Inputs (B,): summed chosen log-probs and the number of chosen target tokens (>= 1).
    """
    per_pair = -policy_chosen_logps / chosen_tokens.clamp(min=1).to(policy_chosen_logps.dtype)
    return _reduce(per_pair, reduction)


@dataclass(frozen=True)
class PreferenceLoss:
    """One dpo.loss entry: its pure function and what it needs beyond summed log-probs."""

    fn: Callable[..., tuple[torch.Tensor, Metrics]]  # (policy_c, policy_r, ref_c, ref_r, beta, reduction, **options)
    # feed per-token averaged log-probs (sum / target tokens), as TRL does for IPO: with summed ones h
    # grows with the response length and IPO's fixed target margin 1 / (2 beta) means different things per pair
    length_normalised: bool = False
    options: tuple[str, ...] = ()  # DPOConfig fields passed on to `fn` (e.g. label_smoothing)

    def __call__(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 lengths: torch.Tensor, beta: float, reduction: str = "mean", **options):
        """Summed log-probs (B,) each; lengths (B, 2): target tokens of chosen, rejected; options: the
        DPOConfig values this loss may take (the ones it does not name are not passed)."""
        logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        if self.length_normalised:
            n_c, n_r = lengths[:, 0].clamp(min=1), lengths[:, 1].clamp(min=1)  # (B, 2) -> chosen (B,), rejected (B,)
            logps = (logps[0] / n_c, logps[1] / n_r, logps[2] / n_c, logps[3] / n_r)
        return self.fn(*logps, beta, reduction=reduction, **{k: options[k] for k in self.options})


# dpo.loss (the recipe's name of the loss) -> its entry; an entry passes on the DPOConfig options it
# names (label_smoothing for "sigmoid") and normalises by length where its loss needs it (IPO)
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(dpo_sigmoid_loss, options=("label_smoothing",)),
    "ipo": PreferenceLoss(dpo_ipo_loss, length_normalised=True),
    "hinge": PreferenceLoss(dpo_hinge_loss),
}
