"""Token shards: preparation (format, resume, bad input), reader checks, and the row sampler."""

import json
import os

import numpy as np
import pytest

from llmtrain.data.shards.prepare import CorpusError, prepare_corpus
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.shards.store import FeistelPermutation, PretrainRows, ShardError, TokenShards
from llmtrain.data.tokenizer_id import vocab_hash as tokenizer_hash

EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE trained here (no hub access): lossless, so decode(encode(x)) == x."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog\n"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "über", "naïve", "日本", "\n", "  "]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(n)]


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")


def _decode_docs(shards, tokenizer):
    toks = shards.tokens(0, shards.num_tokens)
    assert toks[-1] == tokenizer.eos_token_id
    ends = np.flatnonzero(toks == tokenizer.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    np.testing.assert_array_equal(shards.doc_starts_in(0, shards.num_tokens), starts)
    return [tokenizer.decode(toks[a:b].tolist()) for a, b in zip(starts, ends)]


def _mtimes(d):
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)}


@pytest.fixture
def corpus(tmp_path):
    """Two jsonl files, .txt documents (one with a literal EOS string), parquet and a dataset dir."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    a, b = _docs(7, 1), _docs(5, 2)
    _write_jsonl(src / "a.jsonl", a)
    _write_jsonl(src / "b.jsonl", b)
    txt = ["first file\n\nwith paragraphs\n", f"has a literal {EOS} inside", "x"]
    for i, t in enumerate(txt):
        (src / f"t{i}.txt").write_text(t, encoding="utf-8")
    pq_docs = _docs(6, 3)
    pq.write_table(pa.table({"text": pq_docs}), src / "c.parquet", row_group_size=4)
    hf_docs = _docs(4, 4)
    datasets.Dataset.from_dict({"text": hf_docs}).save_to_disk(str(src / "hf"))
    arr_docs = _docs(5, 5)
    (src / "d.json").write_text(json.dumps([{"text": t} for t in arr_docs]))
    sources = [str(src / "*.jsonl"), str(src / "*.txt"), str(src / "c.parquet"), str(src / "hf"),
               str(src / "d.json")]
    return sources, a + b + txt + pq_docs + hf_docs + arr_docs


def test_prepared_shards_decode_back_to_source_documents(tmp_path, tokenizer, corpus):
    sources, expected = corpus
    out = str(tmp_path / "out")
    m = prepare_corpus(sources, tokenizer, out, docs_per_shard=3, num_workers=2, progress=False)
    shards = TokenShards(out, expected_tokenizer_hash=tokenizer_hash(tokenizer))
    assert _decode_docs(shards, tokenizer) == expected  # order kept, EOS only between documents
    assert shards.num_docs == m.total_docs == len(expected)
    assert shards.num_tokens == m.total_tokens and len(m.shards) > 5
    assert m.dtype == "uint16" and m.eos_id == tokenizer.eos_token_id and m.skipped_rows == 0
    assert os.path.getsize(os.path.join(out, m.shards[0].name + ".bin")) == 2 * m.shards[0].num_tokens


def test_tokens_per_shard_sizes_shards_approximately(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "a.jsonl", _docs(200))
    out = str(tmp_path / "out")
    m = prepare_corpus([str(tmp_path / "a.jsonl")], tokenizer, out, tokens_per_shard=500,
                       num_workers=0, progress=False)
    sizes = [s.num_tokens for s in m.shards]
    assert len(sizes) > 5 and max(sizes) < 4 * 500 and m.total_docs == 200


def test_tokens_across_shard_boundaries_and_holdout(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "a.jsonl", _docs(20))
    out = str(tmp_path / "out")
    prepare_corpus([str(tmp_path / "a.jsonl")], tokenizer, out, docs_per_shard=2, num_workers=0,
                   progress=False)
    s = TokenShards(out)
    full = s.tokens(0, s.num_tokens)
    for start, length in [(0, 1), (5, 200), (s.num_tokens - 7, 7), (13, 0)]:
        np.testing.assert_array_equal(s.tokens(start, length), full[start:start + length])
    with pytest.raises(IndexError):
        s.tokens(s.num_tokens - 1, 2)
    train, held = s.split_holdout(eval_tokens=100)
    assert (train.num_tokens, held.num_tokens) == (s.num_tokens - 100, 100)
    np.testing.assert_array_equal(held.tokens(0, 100), full[-100:])
    assert train.num_docs + held.num_docs == s.num_docs == 20  # each document starts in one part
    train, held = s.split_holdout(eval_shards=1)
    assert held.num_tokens == s.manifest.shards[-1].num_tokens and held.num_docs == 2


def test_rerun_is_noop_without_touching_files(tmp_path, tokenizer, corpus, capsys):
    sources, _ = corpus
    out = str(tmp_path / "out")
    prepare_corpus(sources, tokenizer, out, docs_per_shard=3, num_workers=0, progress=False)
    before = _mtimes(out)
    capsys.readouterr()
    prepare_corpus(sources, tokenizer, out, docs_per_shard=3, num_workers=0, progress=False)
    assert "nothing to do" in capsys.readouterr().out
    assert _mtimes(out) == before


def test_resume_redoes_only_missing_shards(tmp_path, tokenizer, corpus, capsys):
    sources, _ = corpus
    out = str(tmp_path / "out")
    m1 = prepare_corpus(sources, tokenizer, out, docs_per_shard=3, num_workers=0, progress=False)
    # simulate an interrupt: no manifest yet, one shard never finished, a half-written temp file
    victim = m1.shards[2].name
    for ext in (".bin", ".json"):
        os.remove(os.path.join(out, victim + ext))
    os.remove(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, f".{victim}.bin.tmp-999"), "wb") as f:
        f.write(b"\0" * 3)
    before = _mtimes(out)
    capsys.readouterr()
    m2 = prepare_corpus(sources, tokenizer, out, docs_per_shard=3, num_workers=0, progress=False)
    assert f"{len(m1.shards) - 1} already done, 1 to tokenize" in capsys.readouterr().out
    after = _mtimes(out)
    changed = {f for f in before if f in after and before[f] != after[f]}
    assert changed == {victim + ".idx.npy"}  # rewritten with the shard; every other file untouched
    assert victim + ".bin" in after and not any(".tmp-" in f for f in after)
    assert m2.shards == m1.shards and m2.total_tokens == m1.total_tokens


def test_truncated_shard_detected_at_open(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "a.jsonl", _docs(6))
    out = str(tmp_path / "out")
    m = prepare_corpus([str(tmp_path / "a.jsonl")], tokenizer, out, docs_per_shard=3,
                       num_workers=0, progress=False)
    path = os.path.join(out, m.shards[1].name + ".bin")
    os.truncate(path, os.path.getsize(path) - 2)
    with pytest.raises(ShardError, match="truncated") as e:
        TokenShards(out)
    msg = str(e.value)
    assert "\n" not in msg and m.shards[1].name in msg and "llmtrain prepare" in msg


def test_corrupted_bytes_detected_with_verify(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "a.jsonl", _docs(6))
    out = str(tmp_path / "out")
    m = prepare_corpus([str(tmp_path / "a.jsonl")], tokenizer, out, num_workers=0, progress=False)
    with open(os.path.join(out, m.shards[0].name + ".bin"), "r+b") as f:
        f.seek(4)
        f.write(b"\xff")
    TokenShards(out)  # size is intact: the cheap check passes
    with pytest.raises(ShardError, match="sha256"):
        TokenShards(out, verify=True)


def test_tokenizer_hash_mismatch_names_both_hashes(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "a.jsonl", _docs(3))
    out = str(tmp_path / "out")
    m = prepare_corpus([str(tmp_path / "a.jsonl")], tokenizer, out, num_workers=0, progress=False)
    with pytest.raises(ShardError) as e:
        TokenShards(out, expected_tokenizer_hash="ab" * 32)
    assert m.tokenizer_sha256[:16] in str(e.value) and "abababab" in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_rows_counted_with_file_and_line(tmp_path, tokenizer, caplog):
    good = _docs(6)
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines.insert(2, b'{"text": "caf\xe9 latin-1"}')  # line 3: not UTF-8
    lines.insert(4, b'{"body": "no text field"}')  # line 5
    lines.insert(5, b'{"text": "unterminated')  # line 6
    lines.insert(6, b"")  # line 7: blank line, empty (not bad)
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline \xff two\n")
    sources = [str(tmp_path / "a.jsonl"), str(tmp_path / "*.txt")]
    out = str(tmp_path / "out")
    m = prepare_corpus(sources, tokenizer, out, num_workers=0, progress=False, max_bad_fraction=0.5)
    assert (m.bad_rows, m.empty_rows, m.skipped_rows) == (4, 2, 6)
    assert m.empty_files == [str(tmp_path / "empty.txt")]
    ex = "\n".join(m.bad_row_examples)
    for where in ("a.jsonl:3: not valid UTF-8", "a.jsonl:5: missing field 'text'",
                  "a.jsonl:6: invalid JSON", "latin1.txt:2: not valid UTF-8"):
        assert where in ex
    assert "empty file skipped" in caplog.text and "a.jsonl:5" in caplog.text
    assert _decode_docs(TokenShards(out), tokenizer) == good
    # the default tolerance (0.1%) aborts, naming the first bad row and the fix
    with pytest.raises(CorpusError, match=r"bad rows of 12 .*a.jsonl:3.*max_bad_fraction"):
        prepare_corpus(sources, tokenizer, str(tmp_path / "out2"), num_workers=0, progress=False)


def test_missing_source_is_a_one_line_error(tmp_path, tokenizer):
    with pytest.raises(CorpusError, match="matches no file") as e:
        prepare_corpus([str(tmp_path / "nope*.jsonl")], tokenizer, str(tmp_path / "o"),
                       progress=False)
    assert "\n" not in str(e.value)


def test_large_txt_file_is_cut_into_documents_at_line_breaks(tmp_path, tokenizer):
    text = "".join(f"line {i} über alles\n" for i in range(40)) + "tail without newline"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    m = prepare_corpus([str(tmp_path / "big.txt")], tokenizer, out, max_txt_doc_bytes=64,
                       num_workers=0, progress=False)
    docs = _decode_docs(TokenShards(out), tokenizer)
    assert m.total_docs > 10 and "".join(docs) == text
    assert all(len(d.encode()) <= 64 for d in docs) and all(d.endswith("\n") for d in docs[:-1])


# --- sampler ---
@pytest.fixture
def two_sources(tmp_path, tokenizer):
    dirs = []
    for i, n in enumerate((40, 15)):
        _write_jsonl(tmp_path / f"s{i}.jsonl", _docs(n, seed=10 + i))
        dirs.append(str(tmp_path / f"out{i}"))
        prepare_corpus([str(tmp_path / f"s{i}.jsonl")], tokenizer, dirs[-1], docs_per_shard=7,
                       num_workers=0, progress=False)
    return [TokenShards(d) for d in dirs]


def test_mixing_weights_give_expected_proportions(two_sources):
    rows = PretrainRows([(two_sources[0], 3.0), (two_sources[1], 1.0)], seq_len=16, seed=1,
                        mix_block_rows=400)
    picks = [rows.locate(k) for k in range(4000)]
    src = np.array([i for i, _ in picks])
    assert (src[:400] == 0).sum() == 300 and (src == 0).sum() == 3000  # exact per block
    assert 0 < (src[:40] == 1).sum() < 40  # interleaved, not in runs
    # within a source, each epoch visits every row exactly once
    for i in (0, 1):
        n = rows.source_rows[i]
        draws = [r for s, r in picks if s == i]
        assert sorted(draws[:n]) == list(range(n)) and sorted(draws[n:2 * n]) == list(range(n))
        assert draws[:n] != draws[n:2 * n]  # a fresh order per epoch


def test_sampler_resume_continues_exactly(two_sources):
    def make():
        return PretrainRows([(two_sources[0], 0.6), (two_sources[1], 0.4)], seq_len=16, seed=7)

    uninterrupted = [next(make_it) for make_it in [make()] for _ in range(30)]
    first = make()
    head = [next(first) for _ in range(12)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = make()
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(18)]
    for a, b in zip(head + tail, uninterrupted):
        for key in ("input_ids", "labels", "position_ids"):
            np.testing.assert_array_equal(a[key], b[key])
    other = PretrainRows([(two_sources[0], 0.6), (two_sources[1], 0.4)], seq_len=16, seed=8)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_position_ids_reset_at_document_starts(two_sources, tokenizer):
    shards = two_sources[0]
    eos = tokenizer.eos_token_id
    packed = PretrainRows(shards, seq_len=64, seed=0)
    plain = PretrainRows(shards, seq_len=64, seed=0, packing=False)
    seen_boundary = False
    for k in range(20):
        row, ref = packed[k], plain[k]
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        assert ids.dtype == np.int64 and ids.shape == labels.shape == pos.shape == (64,)
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(ref["position_ids"], np.arange(64))
        assert (ref["labels"] != IGNORE_INDEX).all()
        np.testing.assert_array_equal(ids[1:], ref["labels"][:-1])  # labels are the next token
        after_eos = np.flatnonzero(ids[:-1] == eos) + 1  # every in-row document start
        assert pos[0] == 0 and (pos[after_eos] == 0).all()
        assert (np.diff(pos)[ids[:-1] != eos] == 1).all()  # counts up inside a document
        masked = np.flatnonzero(labels == IGNORE_INDEX)
        np.testing.assert_array_equal(masked, np.flatnonzero(ids == eos))  # EOS -> next doc: masked
        before_eos = np.flatnonzero(ref["labels"] == eos)
        assert (labels[before_eos] == eos).all()  # the EOS itself is still predicted
        seen_boundary |= after_eos.size > 0
    assert seen_boundary


def test_feistel_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        perm = FeistelPermutation(n, key=42)
        assert sorted(perm(i) for i in range(n)) == list(range(n))
    big = FeistelPermutation(10**8, key=3)
    assert len({big(i) for i in range(2000)}) == 2000


def test_tokenizer_hash_ignores_truncation_and_padding_state(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    before = tokenizer_hash(tok)
    tok.pad_token = tok.eos_token
    tok(["the quick brown fox"], truncation=True, max_length=2, padding="max_length")
    assert tokenizer_hash(tok) == before == tokenizer_hash(tok.backend_tokenizer)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_dataset_folder_prepares_like_its_files(tmp_path, tokenizer, streaming, monkeypatch):
    """A local folder laid out as a hub dataset repository (parquet files under data/, a dataset card
    naming the splits) goes through datasets.load_dataset, as a hub id does; streamed, each of the
    stream's files is one unit. Either way the documents come out in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    parts = [_docs(9, 11), _docs(6, 12)]
    for i, docs in enumerate(parts):
        pq.write_table(pa.table({"content": docs}), repo / "data" / f"train-0000{i}-of-00002.parquet")
    pq.write_table(pa.table({"content": _docs(3, 13)}), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*.parquet\n  - split: test\n    path: data/test-*.parquet\n---\n")
    out = str(tmp_path / "out")
    m = prepare_corpus([str(repo)], tokenizer, out, text_field="content", docs_per_shard=4, num_workers=2,
                       progress=False, hub={"split": "train", "streaming": streaming})
    shards = TokenShards(out, expected_tokenizer_hash=tokenizer_hash(tokenizer))
    assert _decode_docs(shards, tokenizer) == parts[0] + parts[1]
    assert len(m.shards) == (2 if streaming else 4) and m.total_docs == 15 and m.bad_rows == 0
    again = prepare_corpus([str(repo)], tokenizer, out, text_field="content", docs_per_shard=4, num_workers=2,
                           progress=False, hub={"split": "train", "streaming": streaming})
    assert again.input_fingerprint == m.input_fingerprint  # a rerun is a no-op
