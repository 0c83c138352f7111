"""Invariants of llmtrain.losses, each checked against an independent hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.losses import (
    PREFERENCE_LOSSES,
    IGNORE_INDEX,
    causal_lm_loss,
    chosen_nll_loss,
    dpo_hinge_loss,
    dpo_ipo_loss,
    dpo_sigmoid_loss,
    packed_sequence_logps,
    sequence_logps,
    shift_labels,
    token_logps_and_sum_ce,
    token_logps_from_logits,
)

LN2 = 0.6931471805599453


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# fixed pairs: (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
PAIRS = [(-10.0, -12.0, -11.0, -11.5), (-5.0, -4.0, -5.5, -4.2), (-20.0, -25.0, -20.0, -25.0)]


def _as_tensors(pairs):
    return [torch.tensor(column, dtype=torch.float64) for column in zip(*pairs)]


def _hand_h(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


# --- DPO family ---


def test_sigmoid_dpo_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    rejected = torch.tensor([-4.0, -2.0, -9.0])
    loss, metrics = dpo_sigmoid_loss(logps, rejected, logps.clone(), rejected.clone(), beta=0.1)
    assert loss.item() == pytest.approx(LN2, abs=1e-7)
    assert metrics["reward_accuracy"].item() == 0.0
    assert metrics["reward_margin"].item() == 0.0


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_dpo_matches_paper_formula(beta, eps):
    hand = [
        -(1 - eps) * _log_sigmoid(beta * _hand_h(*p)) - eps * _log_sigmoid(-beta * _hand_h(*p)) for p in PAIRS
    ]
    loss, _ = dpo_sigmoid_loss(*_as_tensors(PAIRS), beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(sum(hand) / len(hand), rel=1e-12)
    loss_sum, _ = dpo_sigmoid_loss(*_as_tensors(PAIRS), beta=beta, label_smoothing=eps, reduction="sum")
    assert loss_sum.item() == pytest.approx(sum(hand), rel=1e-12)


def test_ipo_matches_paper_formula():
    beta = 0.1
    hand = [(_hand_h(*p) - 1 / (2 * beta)) ** 2 for p in PAIRS]
    loss, _ = dpo_ipo_loss(*_as_tensors(PAIRS), beta=beta)
    assert loss.item() == pytest.approx(sum(hand) / len(hand), rel=1e-12)


def test_hinge_matches_slic_formula():
    beta = 0.5
    hand = [max(0.0, 1 - beta * _hand_h(*p)) for p in PAIRS]
    # h = 1.5, 0.3, 0 -> every pair is inside the margin (beta * h < 1), none clipped
    assert hand == pytest.approx([0.25, 0.85, 1.0])
    loss, _ = dpo_hinge_loss(*_as_tensors(PAIRS), beta=beta)
    assert loss.item() == pytest.approx(sum(hand) / len(hand), rel=1e-12)
    # a large beta pushes the first pair past the margin: clipped to 0
    loss, _ = dpo_hinge_loss(*_as_tensors(PAIRS[:1]), beta=2.0)
    assert loss.item() == 0.0


def test_dpo_reward_metrics_match_hand_rewards():
    beta = 0.1
    chosen = [beta * (pc - rc) for pc, _, rc, _ in PAIRS]
    rejected = [beta * (pr - rr) for _, pr, _, rr in PAIRS]
    n = len(PAIRS)
    for entry in PREFERENCE_LOSSES.values():
        _, m = entry.fn(*_as_tensors(PAIRS), beta=beta)
        assert m["chosen_reward"].item() == pytest.approx(sum(chosen) / n)
        assert m["rejected_reward"].item() == pytest.approx(sum(rejected) / n)
        assert m["reward_margin"].item() == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / n)
        assert m["reward_accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / n)
        assert m["chosen_logps"].item() == pytest.approx(sum(p[0] for p in PAIRS) / n)
        assert m["rejected_logps"].item() == pytest.approx(sum(p[1] for p in PAIRS) / n)
        assert all(not v.requires_grad for v in m.values())


def test_chosen_nll_is_per_token_nll_of_the_chosen_answer():
    # RPO's extra term: -log pi(y_w|x) / |y_w| per pair, then mean (or sum) over pairs
    chosen_logps, lengths = [-6.0, -1.5, -9.0], [3, 1, 4]
    hand = [6.0 / 3, 1.5 / 1, 9.0 / 4]
    logps = torch.tensor(chosen_logps, dtype=torch.float64, requires_grad=True)
    loss = chosen_nll_loss(logps, torch.tensor(lengths))
    assert loss.item() == pytest.approx(sum(hand) / 3, rel=1e-12)
    assert chosen_nll_loss(logps, torch.tensor(lengths), reduction="sum").item() == pytest.approx(sum(hand))
    loss.backward()  # d/dlogp = -1 / (|y_w| * B): it raises the chosen log-prob, shorter answers more per token
    assert logps.grad.tolist() == pytest.approx([-1 / 9, -1 / 3, -1 / 12])


# --- token log-probs ---


def test_token_logps_from_logits_matches_hand_log_softmax():
    logits = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]]
    labels = [[1, IGNORE_INDEX]]
    out = token_logps_from_logits(torch.tensor(logits), torch.tensor(labels))
    z = logits[0][0]
    hand = z[1] - math.log(sum(math.exp(v) for v in z))
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(hand, rel=1e-6)
    assert out[0, 1].item() == 0.0


def test_shift_labels_moves_next_token_to_each_position():
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[6, 7, 8, -100], [2, -100, -100, -100]]


def _lm_inputs(batch=3, seq=7, hidden=16, vocab=50, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen).mul_(0.3).requires_grad_()
    b = torch.randn(vocab, generator=gen).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :3] = IGNORE_INDEX  # masked prompt
    labels[2, -2:] = IGNORE_INDEX  # padding
    return h, w, b, labels


def _hand_reference_ce(h, w, b, labels, scale):
    """Sum of CE over targets with F.cross_entropy on full logits (independent of losses.py)."""
    logits = h @ w.t() + (b if b is not None else 0.0)
    logits = logits * (scale if scale is not None else 1.0)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [0, 1, 3, 7, 21, 100])  # 21 tokens: divisors 1, 3, 7, 21
@pytest.mark.parametrize("bias,scale", [(False, None), (True, 0.5)])
def test_chunked_ce_loss_and_grads_equal_unchunked(chunk_tokens, bias, scale):
    h, w, b, labels = _lm_inputs(bias=bias)
    ref = _hand_reference_ce(h, w, b, labels, scale)
    ref_grads = torch.autograd.grad(ref, [h, w] + ([b] if bias else []))

    token_logps, ce_sum = token_logps_and_sum_ce(
        h, w, labels, chunk_tokens=chunk_tokens, lm_head_bias=b, logit_scale=scale
    )
    assert token_logps.shape == labels.shape and token_logps.dtype == torch.float32
    assert (token_logps[labels == IGNORE_INDEX] == 0).all()
    grads = torch.autograd.grad(ce_sum, [h, w] + ([b] if bias else []))
    torch.testing.assert_close(ce_sum, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_grads_with_nonuniform_upstream_gradient():
    # DPO weights each token's logp differently: backward must use the incoming gradient
    h, w, _, labels = _lm_inputs()
    weights = torch.linspace(-2.0, 3.0, labels.numel()).view(labels.shape)
    logits = h @ w.t()
    hand = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = (hand * (labels != IGNORE_INDEX) * weights).sum()
    ref_grads = torch.autograd.grad(ref, [h, w])
    token_logps, _ = token_logps_and_sum_ce(h, w, labels, chunk_tokens=4)
    grads = torch.autograd.grad((token_logps * weights).sum(), [h, w])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_bf16_softmax_runs_in_fp32():
    h, w, _, labels = _lm_inputs(vocab=300)
    ref = _hand_reference_ce(h.detach().bfloat16().float(), w.detach().bfloat16().float(), None, labels, None)
    token_logps, ce_sum = token_logps_and_sum_ce(h.detach().bfloat16(), w.detach().bfloat16(), labels, chunk_tokens=5)
    assert token_logps.dtype == torch.float32
    torch.testing.assert_close(ce_sum, ref, rtol=2e-2, atol=0.0)  # bf16 logits, fp32 softmax


def test_dtype_mismatch_fails_with_fix():
    h, w, _, labels = _lm_inputs()
    with pytest.raises(ValueError, match="cast the hidden states"):
        token_logps_and_sum_ce(h.bfloat16(), w, labels, chunk_tokens=4)


# --- causal LM normalisation ---


def _hand_mean_nll(logps, labels):
    total, count = 0.0, 0
    for row_lp, row_lab in zip(logps.tolist(), labels.tolist()):
        for lp, lab in zip(row_lp, row_lab):
            if lab != IGNORE_INDEX:
                total -= lp
                count += 1
    return total / count, count


def test_causal_lm_loss_is_global_token_mean_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])
    loss, metrics = causal_lm_loss(logps, labels, num_target_tokens=3)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert metrics["loss_sum"].item() == pytest.approx(3.5)
    assert metrics["target_tokens"].item() == 3


def test_padding_and_masked_positions_do_not_change_loss():
    h, w, _, labels = _lm_inputs()
    token_logps, _ = token_logps_and_sum_ce(h, w, labels)
    hand, count = _hand_mean_nll(token_logps.detach(), labels)
    loss, _ = causal_lm_loss(token_logps, labels, count)
    # extra padding columns with garbage (even NaN) log-probs
    padded_logps = torch.cat([token_logps, torch.full((3, 4), float("nan"))], dim=1)
    padded_labels = torch.cat([labels, torch.full((3, 4), IGNORE_INDEX)], dim=1)
    padded_loss, _ = causal_lm_loss(padded_logps, padded_labels, count)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert padded_loss.item() == pytest.approx(hand, rel=1e-6)


def test_micro_batches_summed_with_global_count_equal_full_batch_mean():
    h, w, _, labels = _lm_inputs(batch=4)
    token_logps, _ = token_logps_and_sum_ce(h, w, labels)
    hand, global_count = _hand_mean_nll(token_logps.detach(), labels)
    full_loss, _ = causal_lm_loss(token_logps, labels, torch.tensor(global_count))
    # uneven micro-batches (1 row + 3 rows) with different target counts
    micro = [causal_lm_loss(token_logps[s], labels[s], global_count)[0] for s in (slice(0, 1), slice(1, 4))]
    assert full_loss.item() == pytest.approx(hand, rel=1e-6)
    assert sum(m.item() for m in micro) == pytest.approx(hand, rel=1e-6)


def test_all_masked_batch_gives_zero_loss_and_zero_grads():
    h, w, _, labels = _lm_inputs()
    labels = torch.full_like(labels, IGNORE_INDEX)
    for chunk_tokens in (0, 4):
        token_logps, _ = token_logps_and_sum_ce(h, w, labels, chunk_tokens=chunk_tokens)
        for count in (0, torch.tensor(0)):
            loss, metrics = causal_lm_loss(token_logps, labels, count)
            assert loss.item() == 0.0 and not torch.isnan(loss)
            assert metrics["target_tokens"].item() == 0
            grad_h, grad_w = torch.autograd.grad(loss, [h, w], retain_graph=True)
            assert torch.all(grad_h == 0) and torch.all(grad_w == 0)


# --- sequence log-probs ---


def test_sequence_logps_sums_target_tokens_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 3], [3, 4, IGNORE_INDEX]])
    assert sequence_logps(logps, labels).tolist() == [-5.0, -4.5]


def test_packed_equals_unpacked():
    gen = torch.Generator().manual_seed(1)
    # three samples of lengths 4, 2, 5, unpacked: one per row, right-padded to 5
    lengths = [4, 2, 5]
    unpacked_logps = -torch.rand(3, 5, generator=gen)
    unpacked_labels = torch.randint(0, 10, (3, 5), generator=gen)
    for row, n in enumerate(lengths):
        unpacked_labels[row, n:] = IGNORE_INDEX
    unpacked_labels[0, 0] = IGNORE_INDEX  # a masked prompt token
    # packed: row 0 = sample 0 + sample 1, row 1 = sample 2 + 1 padding position
    packed_logps = torch.zeros(2, 6)
    packed_labels = torch.full((2, 6), IGNORE_INDEX)
    seq_ids = torch.full((2, 6), -1)
    placement = [(0, 0), (0, 4), (1, 0)]  # (row, start) of each sample
    for sample, ((row, start), n) in enumerate(zip(placement, lengths)):
        packed_logps[row, start : start + n] = unpacked_logps[sample, :n]
        packed_labels[row, start : start + n] = unpacked_labels[sample, :n]
        seq_ids[row, start : start + n] = sample
    packed_logps[1, 5] = float("nan")  # garbage at a padding position must not leak
    packed = packed_sequence_logps(packed_logps, packed_labels, seq_ids, num_seqs=3)
    unpacked = sequence_logps(unpacked_logps, unpacked_labels)
    hand = [
        sum(lp for lp, lab in zip(unpacked_logps[s, :n].tolist(), unpacked_labels[s, :n].tolist()) if lab != -100)
        for s, n in enumerate(lengths)
    ]
    torch.testing.assert_close(packed, unpacked)
    assert packed.tolist() == pytest.approx(hand, rel=1e-6)
