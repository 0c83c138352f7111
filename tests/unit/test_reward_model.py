"""Reward models in one process: the Bradley-Terry loss against its formula, the last-token read-out,
packed == unpacked rewards, and the objective's loss/accuracy against a hand computation on plain forwards."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import REPO, TINY, TOKENIZER

from llmtrain.data.batching import collate_sequences
from llmtrain.data.preference import encode_pair
from llmtrain.losses import bradley_terry_loss, last_token_values

DPO_TRAIN = os.path.join(REPO, "data/demo/dpo_train.jsonl")


def tiny_reward_model(arch: str = "llama", seed: int = 0):
    """A tiny sequence-classification model (num_labels 1) with a random, non-zero score head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    spec = dict(TINY[arch])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, num_labels=1, **spec)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards of order 1: pairs differ visibly
    model.config.use_cache = False
    return model.eval(), tok


def _pairs(tok, n):
    rows = [json.loads(line) for line in open(DPO_TRAIN)][:n]
    return [encode_pair(tok, r, 64, 48) for r in rows]


def _alone(model, ids) -> float:
    """The reward of one sequence by itself: HF's pooled output of an unpadded single row (its last token)."""
    return model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0, 0].item()


def test_bradley_terry_loss_matches_the_formula_with_margin_and_centering():
    r_c = torch.tensor([1.5, -0.2, 0.3, 2.0])
    r_r = torch.tensor([0.5, 0.1, 0.3, -1.0])
    m = torch.tensor([0.0, 0.5, 1.0, 0.25])
    lam = 0.1
    loss, metrics = bradley_terry_loss(r_c, r_r, margin=m, center_coef=lam, reduction="sum")
    hand = sum(-math.log(1 / (1 + math.exp(-(c - r - mm)))) + lam * (c + r) ** 2
               for c, r, mm in zip(r_c.tolist(), r_r.tolist(), m.tolist()))
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    mean, _ = bradley_terry_loss(r_c, r_r, margin=m, center_coef=lam)
    assert mean.item() == pytest.approx(hand / 4, rel=1e-6)
    assert metrics["reward_accuracy"].item() == 0.5  # 1.5 > 0.5 and 2 > -1; a tie (0.3, 0.3) counts as wrong
    assert metrics["reward_margin"].item() == pytest.approx((1.0 - 0.3 + 0.0 + 3.0) / 4)
    assert metrics["chosen_reward"].item() == pytest.approx(3.6 / 4)
    assert metrics["rejected_reward"].item() == pytest.approx(-0.1 / 4)
    zero, _ = bradley_terry_loss(torch.zeros(3), torch.zeros(3), center_coef=0.5)
    assert zero.item() == pytest.approx(math.log(2), abs=1e-7)


def test_last_token_values_read_each_sequence_end_in_packed_padded_rows():
    values = torch.arange(12, dtype=torch.float32).view(2, 6)
    seq_index = torch.tensor([[0, 0, 1, 1, 1, -1],  # two sequences packed, one padding slot
                              [2, 2, 2, 2, -1, -1]])
    assert last_token_values(values, seq_index, 3).tolist() == [1.0, 4.0, 9.0]
    assert last_token_values(values, torch.full_like(seq_index, -1), 0).shape == (0,)  # a padding batch


def test_packed_equals_unpacked_rewards_and_each_equals_the_sequence_alone():
    from llmtrain.objectives.reward import sequence_rewards

    model, tok = tiny_reward_model()
    flat = [s for p in _pairs(tok, 5) for s in p]
    with torch.no_grad():
        unpacked = sequence_rewards(model, collate_sequences([[s] for s in flat], tok.pad_token_id))
        packed = sequence_rewards(model, collate_sequences([flat[:4], flat[4:]], tok.pad_token_id))
        alone = torch.tensor([_alone(model, ids) for ids, _ in flat])
    torch.testing.assert_close(unpacked, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert alone.std() > 0.1  # the sequences really get different rewards


def test_sequence_ending_in_the_pad_id_is_read_at_its_own_last_token():
    """pad == eos (llmtrain's default when a tokenizer has no pad): HF's pooling would read the token
    before a trailing eos; our read-out reads the sequence's real last token."""
    from llmtrain.objectives.reward import sequence_rewards

    model, tok = tiny_reward_model()
    ids, labels = _pairs(tok, 1)[0][0]
    ids = ids.copy()
    ids[-1] = tok.pad_token_id
    batch = collate_sequences([[(ids, labels)], [(ids[:-3], labels[:-3])]], tok.pad_token_id)
    with torch.no_grad():
        got = sequence_rewards(model, batch)
        assert got[0].item() == pytest.approx(_alone_tap(model, ids), abs=1e-5)


def _alone_tap(model, ids) -> float:
    """The head's output at the last position of one unpadded row (a plain forward of the trunk + head)."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=torch.tensor(ids[None], dtype=torch.long)).last_hidden_state
    return model.score(hidden)[0, -1, 0].item()


@pytest.mark.parametrize("center_coef", [0.0, 0.05])
def test_objective_loss_and_accuracy_match_a_hand_computation(center_coef):
    from llmtrain.config import Config
    from llmtrain.objectives import Reward

    model, tok = tiny_reward_model(seed=1)
    pairs = _pairs(tok, 6)
    flat = [s for p in pairs for s in p]
    batch = collate_sequences([flat[:5], flat[5:]], tok.pad_token_id)  # a pair split across two rows
    cfg = Config()
    cfg.reward.center_coef = center_coef
    task = Reward.from_config(cfg)
    global_pairs = 10  # this micro-batch is part of a larger global batch: loss = its sum / 10
    with torch.no_grad():
        loss, sums = task.loss(model, batch, global_weight=global_pairs)
        hand_loss, right = 0.0, 0
        for chosen, rejected in pairs:
            c, r = _alone(model, chosen[0]), _alone(model, rejected[0])
            hand_loss += math.log1p(math.exp(-(c - r))) + center_coef * (c + r) ** 2
            right += c > r
    assert loss.item() == pytest.approx(hand_loss / global_pairs, rel=1e-5)
    assert sums["reward_accuracy"].item() == right  # sums over pairs; the loop divides by the global count
    assert 0 < right < len(pairs)  # a random head: neither all right nor all wrong


def test_zero_head_makes_every_reward_zero_so_the_first_loss_is_ln2():
    from llmtrain.config import Config
    from llmtrain.objectives import Reward

    model, tok = tiny_reward_model()
    task = Reward.from_config(Config())
    task.prepare_model(model)
    batch = collate_sequences([[s for p in _pairs(tok, 3) for s in p]], tok.pad_token_id)
    loss, sums = task.loss(model, batch, global_weight=3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()
    assert model.score.weight.grad.abs().sum() > 0  # the head still learns from the first step


def test_margin_column_reaches_each_pair_and_its_loss_and_bad_margins_are_bad_rows(tmp_path):
    """reward.margin_column: each row's margin travels with its pair through preparation (chunks, shuffled
    packed batches) into the loss; with a zero head the loss is then mean log(1 + e^m) over the batch's pairs.
    A row whose margin is missing or not a number is a bad row."""
    from types import SimpleNamespace

    from llmtrain.config import Config
    from llmtrain.data.protocol import DataContext
    from llmtrain.data.tokenizer_id import tokenizer_hash
    from llmtrain.objectives import Reward

    rows = [json.loads(line) for line in open(DPO_TRAIN)][:24]
    margins = {}
    for i, r in enumerate(rows):
        r["margin"] = 0.25 * (i % 7)
        chosen = r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][-1]["content"]
        margins[chosen] = r["margin"]
    bad = [dict(rows[0], margin="high"), {k: v for k, v in rows[1].items() if k != "margin"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    cfg = Config()
    cfg.data.train, cfg.data.max_seq_len, cfg.data.max_prompt_len = [str(path)], 64, 48
    cfg.data.packing, cfg.data.max_bad_fraction, cfg.data.prepare_workers = True, 0.2, 1
    cfg.train.micro_batch_size, cfg.reward.margin_column = 4, "margin"
    model, tok = tiny_reward_model()
    info = SimpleNamespace(rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    task = Reward.from_config(cfg)
    data = task.build_data(DataContext(cfg.data, cfg.train, info, tok, tokenizer_hash(tok), str(tmp_path / "out")))
    bad_rows = [json.loads(line) for line in open(tmp_path / "out" / "bad_rows_train.jsonl")]
    assert [b["origin"] for b in bad_rows] == [f"{path}:25", f"{path}:26"]
    assert all("'margin' must be a finite number" in b["reason"] for b in bad_rows)
    task.prepare_model(model)  # zero head: every reward 0, the loss is the margins' alone
    (batch,) = data.batches(data.next_step())
    flat = [s for row in range(batch["input_ids"].shape[0]) for s in _sequences_of_row(batch, row)]
    chosen_texts = [tok.decode(ids[labels != -100][:-1]).strip() for ids, labels in flat[0::2]]
    expected = torch.tensor([margins[t] for t in chosen_texts])
    torch.testing.assert_close(batch["unit_values"], expected)
    with torch.no_grad():
        loss, _ = task.loss(model, batch, global_weight=len(expected))
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(expected)).mean().item(), rel=1e-6)
    assert len(set(expected.tolist())) > 1


def test_margins_are_part_of_the_data_fingerprint(tmp_path):
    """Resume refuses changed training data by its fingerprint: the same pairs with other margins are
    other data (and the same margins the same data)."""
    from types import SimpleNamespace

    from llmtrain.config import Config
    from llmtrain.data.protocol import DataContext
    from llmtrain.data.tokenizer_id import tokenizer_hash
    from llmtrain.objectives import Reward

    rows = [json.loads(line) for line in open(DPO_TRAIN)][:8]
    _, tok = tiny_reward_model()
    info = SimpleNamespace(rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))

    def fingerprint(name, margins):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(dict(r, margin=m)) + "\n" for r, m in zip(rows, margins)))
        cfg = Config()
        cfg.data.train, cfg.data.max_seq_len, cfg.data.max_prompt_len = [str(path)], 64, 48
        cfg.data.prepare_workers, cfg.train.micro_batch_size, cfg.reward.margin_column = 1, 4, "margin"
        ctx = DataContext(cfg.data, cfg.train, info, tok, tokenizer_hash(tok), str(tmp_path / name))
        return Reward.from_config(cfg).build_data(ctx).state_dict()["fingerprint"]

    base = fingerprint("a", [0.5] * 8)
    assert fingerprint("b", [0.5] * 8) == base
    assert fingerprint("c", [0.5] * 7 + [1.0]) != base


def _sequences_of_row(batch, row):
    """(ids, labels) numpy arrays of every sequence in one collated row, in order."""
    seq = batch["seq_index"][row]
    out = []
    for k in sorted(set(seq.tolist()) - {-1}):
        keep = seq == k
        out.append((batch["input_ids"][row][keep].numpy(), batch["labels"][row][keep].numpy()))
    return out
