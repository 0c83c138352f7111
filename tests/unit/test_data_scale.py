"""SFT/DPO data at scale: parallel, resumable preparation into memory-mapped chunks; small planner state;
the fingerprint computed once; hub-layout dataset folders. Results must equal one process doing it all."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import BIN, REPO, TOKENIZER, base_recipe, free_port, run_cmd, train_losses, write_recipe
from llmtrain.config import ConfigError, SourceConfig
from llmtrain.data.chat import RowError
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.prepare_samples import EncodeSpec, Request, TooManyBadRows, prepared_split
from llmtrain.data.preference import encode_pair
from llmtrain.data.sft import encode_row

SFT_DEMO = os.path.join(REPO, "data/demo/sft_train.jsonl")
DPO_DEMO = os.path.join(REPO, "data/demo/dpo_train.jsonl")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def demo_with_bad_rows(tmp_path, demo: str, n: int) -> str:
    """The first n demo rows with malformed ones mixed in (bad JSON, a blank line, a bad role, a non-object)."""
    with open(demo) as f:
        lines = [next(f).rstrip("\n") for _ in range(n)]
    lines[7] = "{not json"
    lines[100] = ""  # blank: skipped, not a row
    lines[233] = json.dumps({"messages": [{"role": "robot", "content": "x"}], "prompt": "p", "chosen": "a",
                             "rejected": "a"})
    lines[n - 2] = "[1, 2]"
    path = tmp_path / os.path.basename(demo)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def reference(tok, path: str, kind: str, max_seq_len: int):
    """What the former single-process builder produced, computed here line by line: sequences in file
    order, and the bad rows as (file:line, reason)."""
    seqs, bad, total = [], [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                bad.append((f"{path}:{lineno}", f"bad JSON ({e.msg})"))
                continue
            if not isinstance(rec, dict):
                bad.append((f"{path}:{lineno}", "row is not a JSON object"))
                continue
            try:
                enc = (encode_pair(tok, rec, max_seq_len, 48) if kind == "dpo"
                       else [encode_row(tok, rec, "auto", max_seq_len, "truncate")])
            except RowError as e:
                bad.append((f"{path}:{lineno}", str(e)))
                continue
            seqs += enc
    return seqs, bad, total


def request(tmp_path, path: str, kind: str, max_seq_len: int, workers: int, chunk_rows: int, **kw) -> Request:
    return Request("data.train", [SourceConfig(path)], EncodeSpec(kind, max_seq_len, max_prompt_len=48), "tok",
                   str(tmp_path / f"cache-{workers}"), chunk_rows=chunk_rows, workers=workers, max_bad_fraction=0.1,
                   **kw)


@pytest.mark.parametrize("kind,demo,n", [("sft", SFT_DEMO, 1200), ("dpo", DPO_DEMO, 600)])
def test_prepared_split_equals_one_process_and_does_not_depend_on_workers(tmp_path, tok, kind, demo, n):
    path = demo_with_bad_rows(tmp_path, demo, n)
    want, want_bad, want_total = reference(tok, path, kind, 96)
    stores = []
    for workers in (1, 4):
        store, report = prepared_split(request(tmp_path, path, kind, 96, workers, chunk_rows=50), tok)
        assert len(store.manifest["chunks"]) == -(-n // 50)
        assert [(b.origin, b.reason) for b in report.bad] == want_bad
        assert report.total == want_total
        assert store.num_seqs == len(want) and len(store) == len(want) // store.seqs_per_unit
        for j, (ids, labels) in enumerate(want):
            got_ids, got_labels = store.seq(j)
            assert np.array_equal(got_ids, ids) and np.array_equal(got_labels, labels), j
        assert store.seq_targets().tolist() == [int((l[1:] != IGNORE_INDEX).sum()) for _, l in want]
        stores.append(store)
    assert stores[0].fingerprint() == stores[1].fingerprint()


def test_training_batches_equal_those_of_the_in_memory_samples(tmp_path, tok):
    """Same samples -> same plans and tensors -> same losses: the loop sees no difference between the
    prepared store (and its eval_fraction views) and the former in-memory SampleSet."""
    import torch

    from llmtrain.config import load_config
    from llmtrain.data.samples import SampleSet
    from llmtrain.data.sft import split_eval
    from llmtrain.distributed import DistInfo
    from llmtrain.data.sequences import SequenceData

    path = demo_with_bad_rows(tmp_path, SFT_DEMO, 600)
    store, _ = prepared_split(request(tmp_path, path, "sft", 96, 1, chunk_rows=64), tok)
    memory = SampleSet.from_sequences(reference(tok, path, "sft", 96)[0])
    for packing in (True, False):
        cfg = load_config(None, ["model.name_or_path=m", "data.train=[x]", "data.max_seq_len=96",
                                 f"data.packing={str(packing).lower()}", "train.micro_batch_size=3",
                                 "train.grad_accum=2", "train.seed=5"])
        datas = []
        for samples in (store, memory):
            train, held = split_eval(samples, 0.1, 5)
            datas.append(SequenceData(cfg.data, cfg.train, DistInfo(1, 0, 2, 2, "torchrun", torch.device("cpu"), "gloo"), train, held,
                                      0, unit_weights=lambda s: s.seq_targets()))
        for _ in range(60):  # past the end of an epoch (540 train units / 12 per step unpacked)
            plans = [d.next_step() for d in datas]
            assert plans[0] == plans[1]
            for a, b in zip(*(d.batches(p) for d, p in zip(datas, plans))):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
        evals = [d.eval_set() for d in datas]
        assert evals[0].global_weight == evals[1].global_weight and len(evals[0].batches) == len(evals[1].batches)
        for a, b in zip(evals[0].batches, evals[1].batches):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_threads_reading_one_store_get_their_own_sequences(tmp_path, tok, monkeypatch):
    """The prefetch thread (train batches) and the main thread (eval, a view of the same store with
    data.eval_fraction) read one store at once while its small file-descriptor LRU evicts."""
    import threading

    from llmtrain.data.samples import SampleStore

    reference, _ = prepared_split(request(tmp_path, SFT_DEMO, "sft", 96, 1, chunk_rows=64), tok)
    want = [reference.seq(j) for j in range(reference.num_seqs)]
    store = SampleStore(reference.dir)
    store._max_open = 2  # 157 chunks x 2 files through 2 descriptors: constant eviction
    real_preadv = os.preadv

    def slow_preadv(fd, buffers, offset):  # widen the window between choosing an fd and reading it
        time.sleep(0.001)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    errors = []

    def read(seed):
        rng = np.random.default_rng(seed)
        try:
            for j in rng.integers(0, store.num_seqs, size=100).tolist():
                ids, labels = store.seq(j)
                if not (np.array_equal(ids, want[j][0]) and np.array_equal(labels, want[j][1])):
                    errors.append(j)
        except Exception as e:  # EBADF, or a short read from another chunk's file that took the fd number
            errors.append(e)

    threads = [threading.Thread(target=read, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_fingerprint_is_computed_once_not_per_step(tmp_path, tok, monkeypatch):
    """The prefetcher saves the data state every step; hashing the data there costs seconds per step
    at 1B tokens. Count every sha256 the data objects make while stepping: none."""
    import torch

    from llmtrain.config import load_config
    from llmtrain.data import samples as samples_module
    from llmtrain.distributed import DistInfo
    from llmtrain.data.sequences import SequenceData

    store, _ = prepared_split(request(tmp_path, SFT_DEMO, "sft", 96, 1, chunk_rows=5000), tok)
    cfg = load_config(None, ["model.name_or_path=m", "data.train=[x]", "data.max_seq_len=96", "data.packing=true"])
    data = SequenceData(cfg.data, cfg.train, DistInfo(0, 0, 1, 1, "single", torch.device("cpu"), "gloo"), store, None, 0,
                        unit_weights=lambda s: s.seq_targets())
    calls = []
    real = hashlib.sha256

    class Counting:
        @staticmethod
        def sha256(*a, **k):
            calls.append(1)
            return real(*a, **k)

    monkeypatch.setattr(samples_module, "hashlib", Counting)
    states = []
    for _ in range(10):  # what loop.Prefetcher does each step
        plan = data.next_step()
        states.append(data.state_dict())
        data.batches(plan)
    assert not calls
    assert len({s["fingerprint"] for s in states}) == 1 and states[0]["fingerprint"] == store.manifest["fingerprint"]


def test_planner_and_sample_index_memory_is_per_unit_never_per_token(tmp_path):
    """10M rows must not cost GBs per rank: the row stream holds numpy arrays (a few bytes per unit, no
    Python list per unit) and a store holds ~16 bytes per sequence, never its tokens."""
    from llmtrain.data.batching import BatchPlanner, RowStream
    from llmtrain.data.samples import ChunkWriter, SampleStore, finalize_split

    n_units = 200_000
    lengths = np.random.default_rng(0).integers(20, 400, size=n_units)
    tracemalloc.start()
    stream = RowStream(lengths, seed=1, packing=True, max_len=2048)
    planner = BatchPlanner(stream, lengths, micro_batch_size=4, grad_accum=2, world_size=2, rank=0)
    for _ in range(5):
        planner.next_step()
    planner_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert planner_peak < 40 * n_units, planner_peak  # lists of lists: > 100 bytes per unit

    seq_tokens, n_seqs = 2000, 4000  # 8M tokens: 32 MB as int32 ids, 64 MB with labels
    rng = np.random.default_rng(1)
    w = ChunkWriter(str(tmp_path), "c0", np.uint16)
    for _ in range(n_seqs):
        ids = rng.integers(0, 800, size=seq_tokens).astype(np.int32)
        w.add(ids, np.where(rng.random(seq_tokens) < 0.5, ids, IGNORE_INDEX).astype(np.int32))
    finalize_split(str(tmp_path), [w.finish({})], 1, np.uint16)
    tracemalloc.start()
    store = SampleStore(str(tmp_path))
    for j in rng.integers(0, n_seqs, size=500):
        store.seq(int(j))
    store_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert store_peak < 64 * n_seqs + 4 * seq_tokens * 8 + (1 << 20), store_peak


def _prepare_cmd(tmp_path, path: str) -> list[str]:
    script = f"""
import sys
from transformers import AutoTokenizer
from llmtrain.config import SourceConfig
from llmtrain.data.prepare_samples import EncodeSpec, Request, prepared_split
tok = AutoTokenizer.from_pretrained({TOKENIZER!r})
req = Request("data.train", [SourceConfig({path!r})], EncodeSpec("sft", 96), "tok", {str(tmp_path / "cache")!r},
              chunk_rows=50, workers=int(sys.argv[1]), max_bad_fraction=0.1)
store, _ = prepared_split(req, tok)
print("fingerprint", store.fingerprint())
"""
    return [sys.executable, "-c", script]


def test_interrupted_preparation_resumes_where_it_stopped(tmp_path, tok):
    """SIGKILL mid-way (rank 0 stalls after 3 chunks): the finished chunks are kept, the rerun
    tokenizes only the rest, and the result equals an uninterrupted preparation."""
    path = demo_with_bad_rows(tmp_path, SFT_DEMO, 1000)
    env = {**os.environ, "PYTHONPATH": REPO, "LLMTRAIN_TEST_PREPARE_DELAY": "0:600:3"}
    proc = subprocess.Popen(_prepare_cmd(tmp_path, path) + ["1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    (split_dir,) = _wait_for_dir(tmp_path / "cache")
    done = lambda: sorted(f for f in os.listdir(split_dir) if f.startswith("c") and f.endswith(".json"))  # noqa: E731
    deadline = time.monotonic() + 240
    while len(done()) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = done()
    assert len(first) == 3 and not os.path.exists(os.path.join(split_dir, "manifest.json")), proc.stdout.read()
    stamps = {f: os.stat(os.path.join(split_dir, f)).st_mtime_ns for f in first}

    out = subprocess.run(_prepare_cmd(tmp_path, path) + ["2"], env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {f: os.stat(os.path.join(split_dir, f)).st_mtime_ns for f in first} == stamps  # kept, not redone
    assert len(done()) == 20
    store, report = prepared_split(request(tmp_path, path, "sft", 96, 1, chunk_rows=100), tok)  # uninterrupted
    assert out.stdout.split("fingerprint ")[1].strip() == store.fingerprint()  # (other chunks, same content)
    assert not [f for f in os.listdir(split_dir) if ".tmp-" in f]  # the killed run's temporary files are gone


def _wait_for_dir(root, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.isdir(root) and os.listdir(root):
            return [os.path.join(root, d) for d in os.listdir(root)]
        time.sleep(0.05)
    raise AssertionError(f"{root} never appeared")


def test_too_many_bad_rows_stop_preparation_early_and_every_later_attempt(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]})
    path.write_text("\n".join(["{oops"] * 30 + [good] * 370) + "\n")
    req = request(tmp_path, str(path), "sft", 64, 1, chunk_rows=40)
    req.max_bad_fraction = 0.01  # 4 bad rows allowed in 400: the first chunk alone has 30
    with pytest.raises(TooManyBadRows) as e:
        prepared_split(req, tok)
    assert not e.value.complete and len(e.value.report.bad) == 30 and e.value.report.total == 40
    (split_dir,) = os.listdir(tmp_path / "cache-1")
    assert len([f for f in os.listdir(tmp_path / "cache-1" / split_dir) if f.endswith(".bin")]) == 1  # stopped
    with pytest.raises(TooManyBadRows):  # the verdict holds for the same budget, without tokenizing again
        prepared_split(req, tok)
    req.max_bad_fraction = 0.1  # a larger budget: preparation continues from the chunk it stopped at
    store, report = prepared_split(req, tok)
    assert len(store) == 370 and len(report.bad) == 30 and report.total == 400


def write_hub_folder(root, rows_by_split: dict, config: str = "default", extra_config: str = "tiny") -> str:
    """A local folder laid out as a dataset repository on the hub: parquet files under data/ and a
    README.md dataset card that defines two configs (subsets) and their splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = ["---", "configs:"]
    for name, sub in ((config, "data"), (extra_config, "tiny")):
        card += [f"- config_name: {name}", "  data_files:"]
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for split, rows in rows_by_split.items():
            rows = rows if sub == "data" else rows[:3]
            pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, sub, f"{split}-00000-of-00001.parquet"))
            card += [f"  - split: {split}", f"    path: {sub}/{split}-*.parquet"]
    card += ["---", "# test dataset"]
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write("\n".join(card) + "\n")
    return str(root)


def _chats(n: int, offset: int = 0) -> list[dict]:
    return [{"dialog": [{"role": "user", "content": f"what is {i} + 1?"},
                        {"role": "assistant", "content": f"{i + 1}"}], "id": i} for i in range(offset, offset + n)]


def test_hub_folder_source_reads_the_named_subset_split_and_columns(tmp_path, tok, monkeypatch):
    from llmtrain.data.sources import SplitReader, is_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = write_hub_folder(tmp_path / "repo", {"train": _chats(40), "test": _chats(12, offset=100)})
    src = SourceConfig(repo, name="default", split="test", columns={"messages": "dialog"})
    assert is_hub(src) and is_hub(SourceConfig("HuggingFaceH4/ultrachat_200k")) and not is_hub(SourceConfig("a.jsonl"))
    req = Request("data.train", [src], EncodeSpec("sft", 64), "tok", str(tmp_path / "cache"), chunk_rows=5, workers=2)
    store, report = prepared_split(req, tok)
    want = [encode_row(tok, {"messages": r["dialog"]}, "auto", 64, "truncate") for r in _chats(12, offset=100)]
    assert report.total == 12 and not report.bad and store.num_seqs == 12
    assert all(np.array_equal(store.seq(j)[0], want[j][0]) and np.array_equal(store.seq(j)[1], want[j][1])
               for j in range(12))
    tiny = SplitReader([SourceConfig(repo, name="tiny", split="train", columns={"messages": "dialog"})], "data.train")
    assert [r.origin for r, _ in tiny.rows()] == [f"{repo}:train:#{i}" for i in range(3)]
    with pytest.raises(ConfigError, match=r"data.train\[0\]: cannot load dataset .*split=validation"):
        SplitReader([SourceConfig(repo, split="validation")], "data.train").plan(10)
    with pytest.raises(ConfigError, match=r"data.train\[0\].columns: .* no column\(s\) \['conv'\]"):
        SplitReader([SourceConfig(repo, split="train", columns={"messages": "conv"})], "data.train").plan(10)


def test_source_columns_must_name_our_fields(tmp_path):
    from llmtrain.config import load_config, sources

    cfg = load_config(None, ["model.name_or_path=m", "data.train=[{path: x, columns: {dialog: messages}}]"])
    with pytest.raises(ConfigError, match=r"keys are our field names .* e.g. \{messages: dialog\}"):
        sources(cfg.data, "data.train")  # the mapping written the wrong way round gets the right one as its hint


@pytest.mark.multiproc
def test_two_ranks_survive_a_rank_preparing_longer_than_the_collective_timeout(tmp_path, tiny_model_dir):
    """Rank 0 stalls 20 s in a chunk while dist.timeout_minutes is 6 s: rank 1 prepares the other chunks,
    then waits for rank 0's by polling files (no collective), says so, and both train. A second run
    with another output_dir and the same data.cache_dir reuses the preparation."""
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=2)
    recipe["data"].update(train=[demo_with_bad_rows(tmp_path, SFT_DEMO, 800)], prepare_chunk_rows=100,
                          cache_dir=str(tmp_path / "shared-cache"), max_bad_fraction=0.01)
    recipe["dist"] = {"timeout_minutes": 0.1}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    proc = run_cmd(cmd, timeout=420, env={"LLMTRAIN_TEST_PREPARE_DELAY": "0:20"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[rank 1] [prepare] waiting for" in proc.stderr and "data.prepare_timeout_minutes" in proc.stderr
    assert len(train_losses(recipe["output_dir"])) == 2
    with open(os.path.join(recipe["output_dir"], "bad_rows_train.jsonl")) as f:
        assert len(f.readlines()) == 3  # the same report as one process: written once, by rank 0
    proc = run_cmd(cmd + [f"output_dir={tmp_path / 'run2'}"], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[prepare]" not in proc.stdout + proc.stderr  # nothing prepared again
    assert train_losses(str(tmp_path / "run2")) == train_losses(recipe["output_dir"])


def test_inspect_data_previews_only_n_rows_and_reuses_the_runs_preparation(tmp_path, tiny_model_dir):
    """The text preview encodes the first N rows only (at 10M rows a whole-split preparation would
    cost CPU-hours); once a run prepared the split, the preview adds its figures from the cache."""
    from conftest import python_cmd

    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=1)
    recipe["data"]["train"] = [demo_with_bad_rows(tmp_path, SFT_DEMO, 300)]
    recipe["data"]["max_bad_fraction"] = 0.05
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cmd(python_cmd("launch/inspect_data.py", "--recipe", path, "-n", "9"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[prepare]" not in proc.stdout and "not prepared yet" in proc.stdout
    assert proc.stdout.count("--- sample ") == 8 and "--- row 7 (" in proc.stdout  # row 8 (line 8) is bad JSON
    cache = os.path.join(recipe["output_dir"], "cache")
    assert not os.path.exists(cache) or not [d for d in os.listdir(cache) if d.startswith("sft-")]
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path), timeout=300)
    assert proc.returncode == 0 and "[prepare] data.train: prepared" in proc.stdout, proc.stderr[-3000:]
    proc = run_cmd(python_cmd("launch/inspect_data.py", "--recipe", path, "-n", "1"), timeout=300)
    assert proc.returncode == 0 and "[prepare]" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "skipped 3 of 299 rows" in proc.stdout


def test_prepare_cli_prepares_an_sft_recipe_where_the_run_looks(tmp_path, tiny_model_dir, tok):
    from llmtrain.config import load_config
    from llmtrain.data.prepare_samples import split_dir
    from llmtrain.cli.prepare import main as prepare_main
    from llmtrain.data.sources import SplitReader
    from llmtrain.data.tokenizer_id import tokenizer_hash
    from llmtrain.models.tokenizer import load_tokenizer
    from llmtrain.data.splits import prepare_request

    recipe = base_recipe(tmp_path, tiny_model_dir)
    recipe["data"].update(train=[demo_with_bad_rows(tmp_path, SFT_DEMO, 300)], eval=[SFT_DEMO.replace("train", "eval")],
                          max_bad_fraction=0.05)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert prepare_main(["--recipe", path, "--task", "sft", "--workers", "1"]) == 0
    cfg = load_config(path)
    run_tok = load_tokenizer(cfg.model)
    for key in ("data.train", "data.eval"):
        req = prepare_request(cfg.data, cfg.output_dir, tokenizer_hash(run_tok), key, "sft")
        assert os.path.isfile(os.path.join(split_dir(req, SplitReader(req.srcs, key), run_tok), "manifest.json"))
