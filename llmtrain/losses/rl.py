"""Online RL: advantages (GRPO, Dr. GRPO, RLOO, GAE), KL estimators, the clipped surrogate and the
clipped value loss. Pure torch functions, each with its formula; hand-checked in tests/unit/test_rl_losses.py.

Every loss returns a *sum* over trained tokens; the caller divides by the global normaliser (the
completion tokens of the optimizer step's global mini-batch: token-mean, as DAPO / TRL "dapo" /
verl "token-mean"), as llmtrain's other losses do. Shapes: rewards (P, G) = prompts x samples of each prompt; token tensors
(B, C) = sequences x completion positions, `mask` 1 on trained completion tokens.
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------- advantages (outcome reward)


def grpo_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3, outcome supervision):

        A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)     std with Bessel's correction (TRL, verl)

    scale_std=False is Dr. GRPO (Liu et al. 2025): A_ij = r_ij - mean_j r_ij. (P, G) -> (P, G).
    A group whose rewards are all equal gets A = 0 (no signal) either way.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (P, 1)
    adv = rewards - mean
    if scale_std:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): leave-one-out baseline

        A_ij = r_ij - 1/(G-1) sum_{k != j} r_ik  =  G/(G-1) (r_ij - mean_j r_ij).   (P, G) -> (P, G)
    """
    G = rewards.shape[1]
    if G < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)
    return rewards - others


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over each completion:

        delta_t = r_t + gamma V_{t+1} - V_t        (V_{T} = 0 after the last completion token)
        A_t     = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t                        (value targets)

    token_rewards, values, mask (B, C); positions with mask 0 (padding after the end) are skipped, as
    in verl compute_gae_advantage_return. Returns (advantages, returns), both (B, C), 0 where masked.
    """
    B, C = token_rewards.shape
    adv = torch.zeros_like(token_rewards)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(C)):
        m = mask[:, t].to(values.dtype)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        next_adv = m * a + (1 - m) * next_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = m * a
    return adv, (adv + values) * mask


def outcome_token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl_per_token: torch.Tensor | None = None,
                          kl_coef: float = 0.0) -> torch.Tensor:
    """PPO token rewards: the sequence score at its last completion token, minus kl_coef * k1 per token
    (the InstructGPT / OpenRLHF / verl 'KL in reward' form):  r_t = -beta k1_t + [t = last] score.
    scores (B,), mask (B, C) -> (B, C)."""
    last = mask.cumsum(1).argmax(1)  # index of the last masked-in token of each row
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    r[torch.arange(mask.shape[0]), last] = scores.float()
    if kl_per_token is not None and kl_coef:
        r = r - kl_coef * kl_per_token * mask
    return r * mask


# --------------------------------------------------------------------------- KL estimators (Schulman 2020)


def kl_k1_tokens(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y_t) - log ref(y_t): unbiased for KL(pi || ref) under samples from pi, can be < 0.
    Used as a *reward penalty* (detached), per token."""
    return logp - ref_logp


def kl_k3_tokens(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 >= 0: unbiased, low variance; used as a *loss term* (GRPO)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of k3 over trained tokens (differentiable w.r.t. logp)."""
    return torch.where(mask.bool(), kl_k3_tokens(logp, ref_logp), torch.zeros_like(logp)).sum()


# --------------------------------------------------------------------------- policy and value losses


def policy_loss_sum(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float = 0.2):
    """Clipped surrogate (PPO, Schulman 2017) with separate clip ranges (DAPO clip-higher, Yu et al. 2025):

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        l_t   = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    Returns (sum_t mask_t l_t, metrics); adv is (B,) per sequence or (B, C) per token.
    On the first inner step logp == old_logp: rho = 1, nothing is clipped and
    d l_t / d logp_t = -A_t (the REINFORCE gradient).
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B,) -> (B, 1), broadcast over tokens
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    m = mask.bool()
    loss_sum = torch.where(m, per_token, torch.zeros_like(per_token)).sum()
    is_clipped = (clipped < unclipped) & m  # the clip bound is the active (smaller) term
    return loss_sum, {"clipped_tokens": is_clipped.sum().detach(), "ratio_sum": (ratio.detach() * m).sum()}


def value_loss_sum(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2):
    """Clipped value loss (PPO2 / TRL / verl):

        L_t = 0.5 max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)     summed over mask

    Returns (sum_t mask_t L_t, metrics): clipped_tokens counts the tokens where the clipped term is the
    larger one (the active term, whose gradient is 0 once V left the clip range; verl's vf_clipfrac)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    per_token = 0.5 * torch.max(unclipped, clipped)
    m = mask.bool()
    loss_sum = torch.where(m, per_token, torch.zeros_like(per_token)).sum()
    return loss_sum, {"clipped_tokens": ((clipped > unclipped) & m).sum().detach()}


def whiten(x: torch.Tensor, mask: torch.Tensor, total: float, total_sq: float, count: float,
           eps: float = 1e-8) -> torch.Tensor:
    """Advantage whitening over the global rollout (verl masked_whiten, OpenRLHF advantage normalisation):

        mu = S1 / N,   var = (S2 - N mu^2) / (N - 1),   x' = (x - mu) / sqrt(var + eps)     on the mask, 0 elsewhere

    with S1, S2, N the sum, sum of squares and count of x over the masked tokens of *every* rank (the
    caller gathers them: the same statistics on 1 rank or N). x, mask (B, C) -> (B, C)."""
    mean = total / count
    var = (total_sq - count * mean * mean) / max(count - 1, 1)
    return (x - mean) * (max(var, 0.0) + eps) ** -0.5 * mask


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, H = -sum_v p_v log p_v: (..., V) -> (...) fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def masked_entropy_sum(logits: torch.Tensor, mask: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """sum over mask of token_entropy, (B, T, V) x (B, T) -> scalar fp32, a metric only (no gradient).
    Computed on the masked positions chunk_rows at a time: the fp32 softmax of a chunk is the only
    extra memory (chunk_rows x V x 4 bytes), never a second (B, T, V) copy."""
    rows = logits[mask.bool()]  # (N, V): completion positions only
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for a in range(0, rows.shape[0], chunk_rows):
        total += token_entropy(rows[a: a + chunk_rows]).sum()
    return total
