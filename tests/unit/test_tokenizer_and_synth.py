"""Invariants of the project tokenizer (llmtrain.tools.tokenizer_train) and the demo data generators (examples/synth.py)."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from conftest import REPO, synth
from llmtrain.data.tokenizer_id import tokenizer_hash
from llmtrain.tools.tokenizer_train import CHATML_TEMPLATE, EOS_TOKEN, IM_END, IM_START, train_bpe_tokenizer

REPO_ROOT = REPO

ROUND_TRIP_TEXTS = [
    "What is 37 + 85? 122",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\n\nand 0123456789",
    "héllo wörld, naïve café — “quotes” 你好 мир 🙂🚀 ٣٤",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tokenizer trained here (not the shipped one), so the tests hold for what the code produces now."""
    out_dir = str(tmp_path_factory.mktemp("tok"))
    texts = synth.pretrain_corpus(300, seed=0) + [m["content"] for r in synth.sft_addition_eval(50) for m in r["messages"]]
    train_bpe_tokenizer(texts, vocab_size=600, out_dir=out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_round_trip_decode_encode_is_identity(tok):
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_every_digit_is_its_own_token(tok):
    tokens = tok.tokenize("12345 + 67890 = 80235")
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345" "67890" "80235")


def test_special_tokens_are_single_ids_and_eos_is_pad(tok):
    for special in (EOS_TOKEN, IM_START, IM_END):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(special)
    assert tok.convert_tokens_to_ids([EOS_TOKEN, IM_START, IM_END]) == [0, 1, 2]
    assert tok.eos_token == EOS_TOKEN and tok.pad_token_id == tok.eos_token_id == 0
    assert tok.encode("a", add_special_tokens=True) == tok.encode("a", add_special_tokens=False)  # no bos/eos added


def test_chat_template_renders_chatml_exactly(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n"
    )
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected[: expected.index("7<|im_end|>")]


def test_chat_template_is_prefix_stable(tok):
    rows = [r for r in synth.sft_addition(200, seed=3) if "messages" in r and len(r["messages"]) >= 4]
    assert rows, "expected multi-turn rows"
    for row in rows[:10]:
        msgs = row["messages"]
        rendered = [tok.apply_chat_template(msgs[:k], tokenize=False) for k in range(1, len(msgs) + 1)]
        for shorter, longer in zip(rendered, rendered[1:]):
            assert longer.startswith(shorter)


def test_assistant_mask_covers_answer_and_im_end(tok):
    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "17"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.convert_ids_to_tokens(masked) == ["1", "7", IM_END]


def test_tokenizer_hash_stable_across_save_load(tok, tok_dir, tmp_path):
    tok(["x " * 50], truncation=True, max_length=8, padding="max_length")  # mutates runtime settings only
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_hash(reloaded) == tokenizer_hash(tok) == tokenizer_hash(AutoTokenizer.from_pretrained(tok_dir))
    reloaded.chat_template = "{{ messages }}"
    assert tokenizer_hash(reloaded) != tokenizer_hash(tok)


def test_shipped_tokenizer_loads_and_is_small():
    path = os.path.join(REPO_ROOT, "assets", "tokenizer")
    if not os.path.isdir(path):
        pytest.skip("assets/tokenizer missing: run python examples/make_assets.py")
    total_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert total_bytes < 1_000_000
    shipped = AutoTokenizer.from_pretrained(path)
    assert shipped.chat_template == CHATML_TEMPLATE and shipped.eos_token_id == 0


def _pair_keys(rows):
    """Unordered operand pairs of every question in rows, for disjointness checks."""
    keys = set()
    for row in rows:
        texts = [m["content"] for m in row.get("messages", [])] + [t["value"] for t in row.get("conversations", [])]
        texts += [row.get("instruction", "") + " " + row.get("input", "")]
        if "prompt" in row:
            texts += [row["prompt"]] if isinstance(row["prompt"], str) else [m["content"] for m in row["prompt"]]
        for text in texts:
            for a, b in synth._QUESTION_RE.findall(text):
                keys.add(frozenset((int(a), int(b))))
    return keys


def test_eval_pairs_disjoint_from_train():
    train = _pair_keys(synth.sft_addition(2000, seed=0)) | _pair_keys(synth.dpo_pairs(1000, seed=0))
    evals = _pair_keys(synth.sft_addition_eval(200, seed=0)) | _pair_keys(synth.dpo_pairs(200, seed=0, split="eval"))
    assert train and evals and not (train & evals)


def test_eval_rows_carry_gold_answer():
    rows = synth.sft_addition_eval(100, seed=1)
    assert len({json.dumps(r["messages"]) for r in rows}) == 100  # distinct questions
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert row["answer"] == assistant["content"] == synth.answer_of(user["content"])


def test_sft_mixes_all_formats_with_correct_answers():
    rows = synth.sft_addition(400, seed=0)
    kinds = {next(k for k in ("messages", "conversations", "instruction") if k in r) for r in rows}
    assert kinds == {"messages", "conversations", "instruction"}
    assert any(r["messages"][0]["role"] == "system" for r in rows if "messages" in r)
    for row in rows:
        if "instruction" in row:
            assert row["output"] == synth.answer_of(row["instruction"] + " " + row["input"])
        turns = [(m["role"], m["content"]) for m in row.get("messages", [])]
        turns += [({"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), t["value"]) for t in row.get("conversations", [])]
        for (prev_role, question), (role, answer) in zip(turns, turns[1:]):
            if role == "assistant":
                assert prev_role == "user" and answer == synth.answer_of(question)


def test_dpo_rejected_is_wrong_and_chosen_right():
    rows = synth.dpo_pairs(500, seed=0)
    assert any(isinstance(r["prompt"], str) for r in rows) and any(isinstance(r["prompt"], list) for r in rows)
    for row in rows:
        if isinstance(row["prompt"], str):
            question, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        else:
            question = row["prompt"][-1]["content"]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == synth.answer_of(question) and rejected != chosen and int(rejected) >= 0


def test_generators_deterministic_for_a_seed():
    for make in (
        lambda s: synth.sft_addition(50, seed=s),
        lambda s: synth.sft_addition_eval(50, seed=s),
        lambda s: synth.dpo_pairs(50, seed=s),
        lambda s: synth.dpo_pairs(50, seed=s, split="eval"),
        lambda s: synth.pretrain_corpus(20, seed=s),
    ):
        assert make(7) == make(7)
        assert make(7) != make(8)


def test_write_jsonl_round_trips(tmp_path):
    rows = synth.dpo_pairs(20, seed=0)
    path = tmp_path / "sub" / "rows.jsonl"
    assert synth.write_jsonl(rows, str(path)) == 20
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_cli_errors_are_one_line(tmp_path):
    script = os.path.join(REPO_ROOT, "launch", "train_tokenizer.py")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for inputs in (["/no/such/file.txt"], [str(empty)]):
        args = [sys.executable, script, "--vocab-size", "300", "--out", str(tmp_path / "t")]
        for path in inputs:
            args += ["--input", path]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


def test_reversal_task_rows_are_correct_disjoint_and_mixed():
    train = synth.sft_reverse(400, seed=0)
    evals = synth.sft_reverse(100, seed=0, split="eval")
    kinds = {("messages" in r, "conversations" in r, "instruction" in r) for r in train}
    assert len(kinds) == 3  # OpenAI, ShareGPT and Alpaca rows
    assert any(r.get("messages", [{}])[0].get("role") == "system" for r in train)
    assert any(len(r.get("messages", [])) >= 4 for r in train)  # multi-turn
    for r in evals:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["answer"] == a == synth.reverse_answer_of(q) and synth.is_eval_number(a[::-1])
    train_numbers = {r["input"] for r in synth.sft_reverse(2000, seed=0) if "input" in r}
    assert not train_numbers & {r["answer"][::-1] for r in evals}
    for row in synth.dpo_reverse_pairs(200, seed=0):
        chosen = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][-1]["content"]
        rejected = row["rejected"] if isinstance(row["rejected"], str) else row["rejected"][-1]["content"]
        prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        assert chosen == synth.reverse_answer_of(prompt) and rejected != chosen
