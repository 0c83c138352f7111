"""SFT data: assistant-only masks for several chat templates, formats, packing, loss normalisation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import TOKENIZER, build_tiny
from llmtrain.config import SourceConfig
from llmtrain.data.batching import BatchPlanner, RowStream, collate_sequences, pack_next_fit
from llmtrain.data.chat import RowError, to_messages, tokenize_chat
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.sft import build_sft_samples
from llmtrain.data.sources import BadRowReport
from llmtrain.losses import causal_lm_loss, shift_labels, token_logps_from_logits

# Templates written after the public Llama-3 and Mistral-instruct formats (no download needed)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

CONVO = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 10 + 7?"},
    {"role": "assistant", "content": "It is 17."},
]


def tokenizer_with(template: str | None, extra_tokens=()):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    if template is not None:
        tok.chat_template = template
    if tok.bos_token is None:
        tok.bos_token = "<|endoftext|>"
    return tok


def trained_spans(tok, ids, labels) -> list[str]:
    """Decode each maximal run of trained tokens."""
    spans, run = [], []
    for i, l in zip(ids.tolist(), labels.tolist()):
        if l != IGNORE_INDEX:
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


@pytest.mark.parametrize("template,end_of_turn", [
    (None, "<|im_end|>"),  # the shipped ChatML template
    (LLAMA3, "<|eot_id|>"),
    (MISTRAL, "<|endoftext|>"),  # Mistral ends an assistant turn with eos_token
])
def test_assistant_only_mask_multi_turn(template, end_of_turn):
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] if template is LLAMA3 else []
    tok = tokenizer_with(template, extra)
    messages = CONVO if template is not MISTRAL else CONVO[1:]  # this Mistral template has no system role
    ids, labels = tokenize_chat(tok, messages)
    spans = trained_spans(tok, ids, labels)
    # exactly the two assistant turns are trained, each including its end-of-turn token
    assert [s.strip() for s in spans] == [f"5{end_of_turn}", f"It is 17.{end_of_turn}"]
    # nothing of the system or user turns is trained
    untrained = tok.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l == IGNORE_INDEX])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in untrained


def test_eos_of_chatml_turn_is_a_trained_label():
    tok = tokenizer_with(None)
    ids, labels = tokenize_chat(tok, CONVO[:3])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    last_end = max(i for i, t in enumerate(ids.tolist()) if t == end)
    assert labels[last_end] == end


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    {"instruction": "hi", "input": "", "output": "yo"},
])
def test_three_formats_give_the_same_conversation(row):
    assert to_messages(row) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize("row,reason", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
    ({"prompt": "hi"}, "no 'messages'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role"),
])
def test_malformed_rows_raise_row_errors(row, reason):
    with pytest.raises(RowError, match=reason):
        to_messages(row)


def test_bad_rows_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    long_prompt = " ".join(["word"] * 200)
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}),
        json.dumps({"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "b"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    tok = tokenizer_with(None)
    report = BadRowReport()
    samples = build_sft_samples(tok, [SourceConfig(str(path))], 64, "truncate", "data.train", report)
    assert len(samples) == 1 and report.total == 4
    origins = {b.origin: b.reason for b in report.bad}
    assert set(origins) == {f"{path}:2", f"{path}:3", f"{path}:4"}
    assert "bad JSON" in origins[f"{path}:2"]
    assert "no trainable token after truncation" in origins[f"{path}:4"]
    with pytest.raises(Exception, match="max_bad_fraction"):
        report.check(0.5, "data.train")
    # drop policy: the long row is dropped by policy, not counted as malformed
    report2 = BadRowReport()
    build_sft_samples(tok, [SourceConfig(str(path))], 64, "drop", "data.train", report2)
    assert report2.dropped_too_long == 1 and len(report2.bad) == 2


def _seqs(n=7, seed=0):
    tok = tokenizer_with(None)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = [{"role": "user", "content": f"What is {rng.integers(100)} + {rng.integers(100)}?"},
                 {"role": "assistant", "content": str(rng.integers(200)) + " ok" * int(rng.integers(1, 6))}]
        out.append(tokenize_chat(tok, turns))
    return out


def _loss(model, batch, weight):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = shift_labels(batch["labels"])
    return causal_lm_loss(token_logps_from_logits(logits, targets), targets, weight)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_packed_equals_unpacked(arch):
    model, tok = build_tiny(arch)
    model.eval()
    seqs = _seqs()
    weight = int(sum((l[1:] != IGNORE_INDEX).sum() for _, l in seqs))
    unpacked = collate_sequences([[s] for s in seqs], tok.pad_token_id)
    packed = collate_sequences([seqs[:3], seqs[3:]], tok.pad_token_id)
    assert packed["input_ids"].shape[0] == 2
    a, b = _loss(model, unpacked, weight), _loss(model, packed, weight)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the value equals a hand-rolled mean over each sample run alone (no batching at all)
    total = 0.0
    for ids, lab in seqs:
        logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long), use_cache=False).logits[0, :-1]
        tgt = torch.tensor(lab[1:], dtype=torch.long)
        keep = tgt != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum").item()
    assert abs(a.item() - total / weight) < 1e-5


def test_padding_and_microbatch_split_do_not_change_the_step_loss():
    model, tok = build_tiny("llama")
    model.eval()
    seqs = _seqs(8, seed=3)
    weight = int(sum((l[1:] != IGNORE_INDEX).sum() for _, l in seqs))
    full = _loss(model, collate_sequences([[s] for s in seqs], tok.pad_token_id), weight)
    # four micro-batches of two, each padded differently, summed like the loop sums them
    split = sum(_loss(model, collate_sequences([[s] for s in seqs[i:i + 2]], tok.pad_token_id), weight)
                for i in range(0, 8, 2))
    torch.testing.assert_close(full, split, rtol=1e-5, atol=1e-6)
    # extra padding: a row padded far beyond its length changes nothing
    padded = collate_sequences([[s] for s in seqs] + [[(np.array([tok.pad_token_id] * 40, np.int32),
                                                        np.full(40, IGNORE_INDEX, np.int32))]], tok.pad_token_id)
    torch.testing.assert_close(full, _loss(model, padded, weight), rtol=1e-5, atol=1e-6)
    # a micro-batch with no trained token gives exactly 0, not NaN
    empty = collate_sequences([[(np.array([1, 2, 3], np.int32), np.full(3, IGNORE_INDEX, np.int32))]], tok.pad_token_id)
    assert _loss(model, empty, weight).item() == 0.0


def test_next_fit_packing_respects_the_row_budget_and_keeps_every_unit():
    lengths = np.array([5, 9, 3, 7, 2, 10, 1])
    rows = pack_next_fit(np.arange(7), lengths, 10)
    assert sorted(u for r in rows for u in r) == list(range(7))
    assert all(lengths[r].sum() <= 10 for r in rows)


def test_global_batch_is_the_same_for_any_split_of_ranks_and_accumulation():
    lengths = np.random.default_rng(0).integers(5, 40, size=50)
    weights = lengths - 1

    def step_units(world, ga, mbs, steps=5):
        out = []
        planners = [BatchPlanner(RowStream(lengths, 7, True, 64), weights, micro_batch_size=mbs, grad_accum=ga,
                                 world_size=world, rank=r) for r in range(world)]
        for _ in range(steps):
            plans = [p.next_step() for p in planners]
            assert len({p.global_weight for p in plans}) == 1  # every rank agrees without communicating
            out.append(sorted(u for p in plans for mb in p.micro_batches for row in mb for u in row))
        return out

    assert step_units(1, 4, 2) == step_units(2, 2, 2) == step_units(4, 1, 2) == step_units(2, 4, 1)


def test_planner_resumes_at_the_same_position():
    lengths = np.random.default_rng(1).integers(5, 40, size=30)
    a = BatchPlanner(RowStream(lengths, 3, False, 64), lengths, micro_batch_size=4, grad_accum=1, world_size=1, rank=0)
    seen = [a.next_step().micro_batches for _ in range(12)]  # crosses epoch boundaries (30 units / 4 per step)
    b = BatchPlanner(RowStream(lengths, 3, False, 64), lengths, micro_batch_size=4, grad_accum=1, world_size=1, rank=0)
    for _ in range(5):
        b.next_step()
    c = BatchPlanner(RowStream(lengths, 3, False, 64), lengths, micro_batch_size=4, grad_accum=1, world_size=1, rank=0)
    c.load_state_dict(b.state_dict())
    assert [c.next_step().micro_batches for _ in range(7)] == seen[5:]
    # each epoch is a permutation: every unit exactly once per 30 units
    flat = [u for mb in seen for rows in mb for row in rows for u in row]
    assert sorted(flat[:30]) == list(range(30))


def test_prepared_chunks_read_back_the_sequences_written(tmp_path):
    from llmtrain.data.samples import ChunkWriter, SampleStore, data_fingerprint, finalize_split

    seqs = _seqs(5)
    sides = []
    for c, part in enumerate((seqs[:2], seqs[2:])):  # two chunks
        w = ChunkWriter(str(tmp_path), f"c{c}", np.uint16)
        for ids, labels in part:
            w.add(ids, labels)
        sides.append(w.finish({}))
    finalize_split(str(tmp_path), sides, 1, np.uint16)
    t = SampleStore(str(tmp_path))
    assert len(t) == 5 and t.num_seqs == 5
    one = ChunkWriter(str(tmp_path), "whole", np.uint32)  # the same sequences in one chunk, other dtype
    for ids, labels in seqs:
        one.add(ids, labels)
    assert data_fingerprint(1, [one.finish({})]) == t.fingerprint()  # identity of the content, not the layout
    for i in range(5):
        assert np.array_equal(t.seq(i)[0], seqs[i][0]) and np.array_equal(t.seq(i)[1], seqs[i][1])
    assert t.seq_targets().tolist() == [int((l[1:] != IGNORE_INDEX).sum()) for _, l in seqs]
    assert t.unit_lengths().tolist() == [len(i) for i, _ in seqs]


def test_gradient_checkpointing_switch_keeps_loss_and_gradients(tiny_model_dir):
    from llmtrain.config import load_config
    from llmtrain.models.loading import load_model
    from llmtrain.models.tokenizer import load_tokenizer

    grads = []
    for flag in (False, True):
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.train=[x]",
                                 f"model.gradient_checkpointing={str(flag).lower()}"])
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, cfg.lora, cfg.train.seed, tok, {"zero_optimization": {"stage": 0}}, "fp32",
                           torch.device("cpu"))
        assert model.is_gradient_checkpointing == flag and model.config.use_cache is False
        model.train()
        seqs = _seqs(4, seed=5)
        weight = int(sum((l[1:] != IGNORE_INDEX).sum() for _, l in seqs))
        loss = _loss(model, collate_sequences([seqs], tok.pad_token_id), weight)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
