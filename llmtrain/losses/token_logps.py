"""Per-token log-probs of the labels: from logits, or chunked straight from the LM head's hidden states."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.labels import IGNORE_INDEX

Metrics = dict[str, torch.Tensor]  # detached tensors; the caller decides when to pay for .item()


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
