"""RL prompts go through the shared preparation (llmtrain.data.prepare_samples, kind "rl"): the
prompts, their columns and file:line read back by position equal a hand rendering of each row,
whatever the chunking; bad rows are counted; the answers are part of the data's fingerprint."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import TOKENIZER
from llmtrain.config import DataConfig, TrainConfig
from llmtrain.data.chat import ensure_chat_template
from llmtrain.data.protocol import DataContext
from llmtrain.data.tokenizer_id import tokenizer_hash
from llmtrain.objectives.rl.prompts import load_prompts

ROWS = [{"messages": [{"role": "user", "content": "Reverse 12"}], "answer": "21"},
        {"instruction": "Reverse the digits.", "input": "345", "output": "543", "answer": "543"},
        {"prompt": "Reverse 9" * 80, "answer": "x"},  # too long: a counted bad row
        {"prompt": "Reverse 67", "answer": "76", "level": 2},
        {"conversations": [{"from": "human", "value": "Reverse 8 ünï"}, {"from": "gpt", "value": "8"}],
         "answer": "8", "meta": {"k": [1, None]}}]
EXPECTED_USER = ["Reverse 12", "Reverse the digits.\n\n345", "Reverse 67", "Reverse 8 ünï"]


def _tok():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ensure_chat_template(tok)
    return tok


def _ctx(tmp_path, path, tok, **data):
    d = DataConfig(train=[str(path)], max_prompt_len=40, **data)
    return DataContext(d, TrainConfig(), SimpleNamespace(rank=0, world_size=1, local_world_size=1), tok,
                       tokenizer_hash(tok), str(tmp_path / "out"))


def _write(path, rows, bad_line=True):
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in rows) + ("\n{bad json\n" if bad_line else "\n"))


@pytest.mark.parametrize("chunk_rows", [1, 2, 4096])  # payload offsets across chunk boundaries
def test_prompt_rows_read_back_equal_a_hand_rendering(tmp_path, chunk_rows):
    tok = _tok()
    path = tmp_path / "p.jsonl"
    _write(path, ROWS)
    ps = load_prompts(_ctx(tmp_path, path, tok, max_bad_fraction=0.5, prepare_chunk_rows=chunk_rows,
                           prepare_workers=1), "data.train")
    assert len(ps) == 4 and ps.column_names == ["answer", "level", "meta"]
    messages, columns, origins = ps.rows([3, 0, 3, 1, 2])  # any order, repeats
    assert [m[-1]["content"] for m in messages] == [EXPECTED_USER[i] for i in (3, 0, 3, 1, 2)]
    assert all(m[-1]["role"] == "user" for m in messages)  # the final assistant turn is what is generated
    assert columns["answer"] == ["8", "21", "8", "543", "76"] and columns["level"] == [None, None, None, None, 2]
    assert columns["meta"][0] == {"k": [1, None]}
    assert origins == [f"{path}:{n}" for n in (5, 1, 5, 2, 4)]  # the file's own line numbers (line 3 was bad)
    all_messages = ps.rows(list(range(4)))[0]
    for p, m in enumerate(all_messages):  # ids == the chat template's generation prompt, tokenized by hand
        text = tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        assert ps.ids(p) == tok(text, add_special_tokens=False).input_ids
    assert ps.max_len() == max(len(ps.ids(p)) for p in range(4))
    bad = [json.loads(x) for x in open(tmp_path / "out" / "bad_rows_train.jsonl")]
    assert [(b["origin"], b["reason"].split(" ")[0]) for b in bad] == [(f"{path}:3", "prompt"), (f"{path}:6", "bad")]


def test_too_many_bad_prompt_rows_is_one_error_line(tmp_path):
    tok = _tok()
    path = tmp_path / "p.jsonl"
    _write(path, ROWS)
    with pytest.raises(Exception, match="above data.max_bad_fraction"):
        load_prompts(_ctx(tmp_path, path, tok), "data.train")


def test_answers_are_part_of_the_prompts_fingerprint(tmp_path):
    tok = _tok()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, [ROWS[0], ROWS[3]], bad_line=False)
    _write(b, [ROWS[0], {**ROWS[3], "answer": "77"}], bad_line=False)  # same prompts, another gold answer
    fa = load_prompts(_ctx(tmp_path / "x", a, tok), "data.train").fingerprint
    fb = load_prompts(_ctx(tmp_path / "y", b, tok), "data.train").fingerprint
    fa2 = load_prompts(_ctx(tmp_path / "z", a, tok, prepare_chunk_rows=1), "data.train").fingerprint
    assert fa != fb and fa == fa2  # content, not chunking


def test_prompts_keep_no_token_or_row_in_memory(tmp_path):
    """What stays resident per prompt is the store's index (int32 x 2), its payload lengths (int32) and
    offsets (int64), about 28 bytes: nothing of the rows is held (the rows are read when drawn)."""
    tok = _tok()
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Reverse {i:07d}", "answer": f"{i:07d}"[::-1]} for i in range(3000)]
    _write(path, rows, bad_line=False)
    ps = load_prompts(_ctx(tmp_path, path, tok, prepare_chunk_rows=512), "data.train")
    store = ps.store
    arrays = [v for v in vars(store).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) <= 40 * len(ps)
    assert not any(isinstance(v, (list, dict)) and len(v) >= len(ps) for v in vars(store).values())
    assert ps.rows([2999])[1]["answer"] == ["9992000"]


def test_prompts_do_not_depend_on_the_files_spelling_or_the_day(tmp_path):
    """The fingerprint leaves out file:line (a moved or re-spelled file is the same data, so a resume is
    exact); a template that prints today's date renders data.template_date (a cached preparation does
    not depend on the day it ran); a lone surrogate in a column is kept, not a bad row."""
    import os

    tok = _tok()
    tok.chat_template = "{{ strftime_now('%Y-%m-%d') }}|{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:"
    a = tmp_path / "a" / "p.jsonl"
    a.parent.mkdir()
    rows = [ROWS[0], {"prompt": "Reverse 5", "answer": "\ud800"}]
    a.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    b = tmp_path / "b" / "q.jsonl"
    b.parent.mkdir()
    os.link(a, b)
    pa = load_prompts(_ctx(tmp_path / "x", a, tok, template_date="2024-01-02"), "data.train")
    pb = load_prompts(_ctx(tmp_path / "y", b, tok, template_date="2024-01-02"), "data.train")
    assert pa.fingerprint == pb.fingerprint and pa.rows([0])[2] != pb.rows([0])[2]
    assert pa.ids(0) == tok("2024-01-02|Reverse 12\nA:", add_special_tokens=False).input_ids
    assert pa.rows([1])[1]["answer"] == ["\ud800"]
