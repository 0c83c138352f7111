"""Loss functions: pure functions ``(inputs) -> (loss, metrics)``.

Torch only (no transformers / deepspeed import), so every loss can be tested on CPU
against hand computations.

Conventions
-----------
* ``labels`` use ``IGNORE_INDEX`` (-100) for positions that are not trained
  (padding, masked prompts, sample boundaries in packed rows).
* Token-level functions take hidden states / logits *already aligned* with the labels:
  position ``t`` predicts ``labels[:, t]``. ``shift_labels`` does that alignment for
  causal LMs (hidden at ``t`` predicts token ``t + 1``).
* Log-probs are always computed in fp32, whatever the model dtype.
* Normalisation over the global batch (all micro-batches, all ranks) is the caller's
  job: ``causal_lm_loss`` takes the global target-token count, the DPO losses take
  ``reduction="sum"`` so the caller can divide by the global pair count.
* ``metrics`` values are detached tensors; nothing here calls ``.item()`` (which would
  sync the device), so logging decides when to pay for that.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of positions that carry no loss (same as HF / F.cross_entropy)

Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with hidden states for next-token prediction.

    ``out[:, t] = labels[:, t + 1]`` and ``out[:, -1] = IGNORE_INDEX``, so the hidden
    state at position ``t`` predicts token ``t + 1``. Shifting the labels (rather than
    slicing hidden states) keeps every tensor at length T.
    """
    # labels: (B, T) -> (B, T - 1) next tokens + (B, 1) ignored tail -> (B, T)
    tail = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], tail], dim=1)


def _target_mask_and_safe_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of trained positions, labels with ignored positions replaced by 0 for gather)."""
    target = labels != IGNORE_INDEX
    return target, torch.where(target, labels, torch.zeros_like(labels))


# ---------------------------------------------------------------------------
# token log-probs
# ---------------------------------------------------------------------------


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token: ``log softmax(z_t)[y_t] = z_t[y_t] - logsumexp(z_t)``.

    logits (B, T, V) in any float dtype, labels (B, T) aligned with them.
    Returns (B, T) fp32, exactly 0 at ``IGNORE_INDEX`` positions. Computed as
    gather minus logsumexp, which avoids materialising a second (B, T, V) log-softmax.
    """
    target, safe_labels = _target_mask_and_safe_labels(labels)
    logits = logits.float()  # softmax in fp32 even for bf16 models
    # logits: (B, T, V), safe_labels: (B, T) -> (B, T, 1) -> picked (B, T)
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(target, logps, torch.zeros_like(logps))


def _lm_head_logits_fp32(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
) -> torch.Tensor:
    """``(h W^T + b) * scale`` for (n, H) hidden -> (n, V) fp32 logits.

    The matmul runs in the model dtype (as the HF lm_head does); only the result is
    upcast, so softmax and log-probs are fp32.
    """
    logits = F.linear(hidden, weight, bias).float()
    if logit_scale is not None:
        logits = logits.mul_(logit_scale)
    return logits


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token label log-probs through the LM head, ``chunk_tokens`` rows at a time.

    Forward keeps only the per-token logsumexp (N,); backward recomputes each chunk's
    logits, so at most (chunk_tokens, V) fp32 logits exist at any time, in forward and
    in backward. Gradient of ``l_i = z_i[y_i] - logsumexp(z_i)`` wrt logits is
    ``g_i * (onehot(y_i) - softmax(z_i))``.
    """

    @staticmethod
    def forward(ctx, hidden_flat, weight, bias, labels_flat, chunk_tokens, logit_scale):
        # hidden_flat: (N, H), labels_flat: (N,)
        num_tokens = hidden_flat.shape[0]
        token_logps = hidden_flat.new_empty(num_tokens, dtype=torch.float32)
        logsumexp = hidden_flat.new_empty(num_tokens, dtype=torch.float32)
        target, safe_labels = _target_mask_and_safe_labels(labels_flat)
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            logits = _lm_head_logits_fp32(hidden_flat[start:end], weight, bias, logit_scale)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            # logits: (n, V), labels: (n,) -> (n, 1) -> picked (n,)
            picked = logits.gather(-1, safe_labels[start:end].unsqueeze(-1)).squeeze(-1)
            token_logps[start:end] = picked - lse
            logsumexp[start:end] = lse
            del logits  # free the chunk before the next one is allocated
        token_logps = torch.where(target, token_logps, torch.zeros_like(token_logps))
        ctx.save_for_backward(hidden_flat, weight, bias, labels_flat, logsumexp)
        ctx.chunk_tokens = chunk_tokens
        ctx.logit_scale = logit_scale
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        hidden_flat, weight, bias, labels_flat, logsumexp = ctx.saved_tensors
        chunk_tokens, logit_scale = ctx.chunk_tokens, ctx.logit_scale
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        target, safe_labels = _target_mask_and_safe_labels(labels_flat)
        # ignored positions were set to 0 in forward: no gradient flows through them
        grad_out = torch.where(target, grad_token_logps.float(), torch.zeros_like(logsumexp))  # (N,)

        grad_hidden = torch.empty_like(hidden_flat) if need_hidden else None
        # accumulated in the weight dtype across chunks (as Liger's fused linear CE does):
        # an fp32 accumulator would cost V*H*4 bytes, 2 GB for a 128k x 4096 head
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden_flat.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden_flat.shape[0])
            h = hidden_flat[start:end]  # (n, H)
            g = grad_out[start:end].unsqueeze(-1)  # (n,) -> (n, 1)
            logits = _lm_head_logits_fp32(h, weight, bias, logit_scale)  # (n, V)
            # dl/dz = g * (onehot(y) - softmax(z)), built in place in the logits buffer
            grad_logits = logits.sub_(logsumexp[start:end].unsqueeze(-1)).exp_().mul_(-g)
            grad_logits.scatter_add_(1, safe_labels[start:end].unsqueeze(-1), g)
            if logit_scale is not None:
                grad_logits.mul_(logit_scale)  # z = scale * (h W^T + b)
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(weight.dtype)  # (n, V)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight  # (n, V) @ (V, H) -> (n, H)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h)  # (V, n) @ (n, H) -> (V, H)
            del logits, grad_logits
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def token_logps_and_sum_ce(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 0,  # flattened tokens per LM-head chunk; 0 = full (tokens x vocab) logits
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,  # multiplies logits after the head (e.g. Cohere); None = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-token log-probs straight from the final hidden states, optionally chunked.

    ``z_t = (h_t W^T + b) * scale``,  ``logp_t = z_t[y_t] - logsumexp(z_t)``,
    ``ce_sum = -sum_{t: y_t != IGNORE} logp_t``.

    hidden (B, T, H) must already be aligned with labels (B, T): position t predicts
    ``labels[:, t]`` (use ``shift_labels``). Returns ``(token_logps, ce_sum)``:
    token_logps (B, T) fp32 with 0 at ignored positions (feed it to ``causal_lm_loss``
    or ``sequence_logps``), ce_sum a 0-dim fp32 tensor (unnormalised, differentiable).

    With ``chunk_tokens > 0`` the (B*T, V) fp32 logits are never materialised: forward
    and backward both go through at most ``chunk_tokens`` rows at a time, and backward
    recomputes each chunk's logits (one extra LM-head matmul; the price of the memory).
    Gradients wrt hidden, weight and bias equal the unchunked ones to float tolerance.
    The weight must be a full tensor: under ZeRO-3 call this where the lm_head
    parameter is gathered (e.g. inside ``deepspeed.zero.GatheredParameters``).
    """
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(
            f"hidden dtype {hidden.dtype} != lm_head weight dtype {lm_head_weight.dtype}; "
            "cast the hidden states to the head's dtype (or run the model in one dtype)"
        )
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 0 (0 = no chunking)")
    if chunk_tokens == 0:
        logits = _lm_head_logits_fp32(hidden, lm_head_weight, lm_head_bias, logit_scale)  # (B, T, V)
        token_logps = token_logps_from_logits(logits, labels)
    else:
        # hidden: (B, T, H) -> (B*T, H); labels: (B, T) -> (B*T,)
        hidden_flat = hidden.reshape(-1, hidden.shape[-1])
        labels_flat = labels.reshape(-1)
        token_logps_flat = _ChunkedTokenLogps.apply(
            hidden_flat, lm_head_weight, lm_head_bias, labels_flat, chunk_tokens, logit_scale
        )
        token_logps = token_logps_flat.view(labels.shape)  # (B*T,) -> (B, T)
    return token_logps, -token_logps.sum()


# ---------------------------------------------------------------------------
# causal LM
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# sequence log-probs (DPO inputs)
# ---------------------------------------------------------------------------


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


def split_chosen_rejected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the chosen-first concatenation of a DPO batch along dim 0."""
    if x.shape[0] % 2 != 0:
        raise ValueError(
            f"DPO batch has {x.shape[0]} rows; expected 2B rows (B chosen, then B rejected)"
        )
    num_pairs = x.shape[0] // 2
    # x: (2B, ...) -> chosen (B, ...), rejected (B, ...)
    return x[:num_pairs], x[num_pairs:]


# ---------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------

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

    The log-probs are used as passed. The DPO task feeds *per-token averaged* log-probs
    (sum / number of target tokens), as TRL does, which keeps h on a scale where the
    1/(2 beta) target means the same for short and long responses.
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


# name in the recipe (dpo.loss_type) -> loss function. Extra arguments (label_smoothing for
# "sigmoid") are bound by the caller, e.g. with functools.partial.
DPO_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": dpo_ipo_loss,
    "hinge": dpo_hinge_loss,
}
