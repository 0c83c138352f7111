"""SFT/DPO preparation at the sizes and layouts users bring (review findings on issue 13): work and
metadata that must stay O(file) / O(1) per chunk / O(1) per store open, shared caches, CPU quotas.
Each test counts what would blow up at scale (rows decoded, bytes parsed, files opened, objects
built) instead of timing it."""
from __future__ import annotations

import builtins
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import REPO, TOKENIZER
from llmtrain.config import SourceConfig
from llmtrain.data.chat import RowError
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.prepare_samples import EncodeSpec, Request, prepared_split
from llmtrain.data.sft import encode_row

SFT_DEMO = os.path.join(REPO, "data/demo/sft_train.jsonl")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def demo_records(n: int, only_messages: bool = False) -> list[dict]:
    """The first n demo rows (chats in several formats), or the first n in `messages` format (one
    Arrow schema, for Parquet)."""
    out = []
    with open(SFT_DEMO) as f:
        for line in f:
            rec = json.loads(line)
            if not only_messages or list(rec) == ["messages"]:
                out.append(rec)
            if len(out) == n:
                return out
    return out


def request(cache: str, path: str, workers: int = 1, chunk_rows: int = 4096, **kw) -> Request:
    return Request("data.train", [SourceConfig(path)], EncodeSpec("sft", 96), "tok", cache, chunk_rows=chunk_rows,
                   workers=workers, max_bad_fraction=0.2, **kw)


def assert_store_equals(store, tok, records: list):
    """The store holds exactly encode_row of each good record, in order (the independent reference)."""
    want = []
    for rec in records:
        try:
            want.append(encode_row(tok, rec, "auto", 96, "truncate"))
        except RowError:
            pass
    assert store.num_seqs == len(want)
    for j, (ids, labels) in enumerate(want):
        got_ids, got_labels = store.seq(j)
        assert np.array_equal(got_ids, ids) and np.array_equal(got_labels, labels), j


# --------------------------------------------------------------------------- 1. Parquet row groups


def test_parquet_with_one_big_row_group_is_decoded_once_not_once_per_chunk(tmp_path, tok, monkeypatch):
    """pandas writes a 1M-row file as one row group: chunks that each read_row_group() it and slice
    decompress the whole file once per chunk. Count the rows pyarrow decodes per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = demo_records(3000, only_messages=True)
    path = str(tmp_path / "one_group.parquet")
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=len(records))
    decoded: dict = {}
    real_init = pq.ParquetFile.__init__

    def init(self, source, *a, **k):
        self._counted = os.path.basename(str(source))
        real_init(self, source, *a, **k)

    def counting(name):
        real = getattr(pq.ParquetFile, name)

        def wrapper(self, *a, **k):
            out = real(self, *a, **k)
            if name == "iter_batches":
                return (_count(self, b) for b in out)
            return _count(self, out)
        return wrapper

    def _count(pf, table):
        decoded[pf._counted] = decoded.get(pf._counted, 0) + table.num_rows
        return table

    monkeypatch.setattr(pq.ParquetFile, "__init__", init)
    for name in ("read_row_group", "read_row_groups", "iter_batches", "read"):
        monkeypatch.setattr(pq.ParquetFile, name, counting(name))
    store, _ = prepared_split(request(str(tmp_path / "cache"), path, chunk_rows=128), tok)
    assert len(store.manifest["chunks"]) >= 8  # the file is shared by many chunks ...
    assert decoded["one_group.parquet"] <= len(records), decoded  # ... and decoded once in total
    assert sum(decoded.values()) <= 2 * len(records), decoded  # plus once more from the staged copy
    assert_store_equals(store, tok, records)


# --------------------------------------------------------------------------- 2. JSON arrays


_JSON_WORKER = r"""
import json, pickle, sys, tracemalloc
from llmtrain.config import SourceConfig
from llmtrain.data.sources import SplitReader
path = sys.argv[1]
try:
    from llmtrain.data import json_array
    json_array.BLOCK_BYTES = 1 << 18  # (the scan's memory is a few blocks: 4 MiB ones would dwarf this small file)
except ImportError:  # code without the scan
    pass
tracemalloc.start()
reader = SplitReader([SourceConfig(path)], "data.train")
chunks = reader.plan(64, target_chunks=1000)
plan_peak = tracemalloc.get_traced_memory()[1]
worker = pickle.loads(pickle.dumps(reader))  # what a spawned tokenizer process receives
tracemalloc.reset_peak()
rows = list(worker.read(chunks[len(chunks) // 2]))
read_peak = tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]
print(json.dumps({"chunks": len(chunks), "plan_peak": plan_peak, "read_peak": read_peak,
                  "origins": [r.origin for r in rows], "records": [getattr(r, "record", None) for r in rows]}))
"""


def test_json_array_is_never_parsed_whole_by_the_planner_or_a_worker(tmp_path):
    """A 2 GB .json array parsed by every worker is ~5 GB of Python objects each; measured in a fresh
    process (as a spawned worker is): planning and reading one chunk stay far below the file size."""
    records = [{"messages": [{"role": "user", "content": f"question {i} " + "word " * 300},
                             {"role": "assistant", "content": f"answer {i}, with \"quotes\" and [brackets]"}]}
               for i in range(3000)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(records, indent=1))
    size = os.path.getsize(path)  # ~5 MB
    out = subprocess.run([sys.executable, "-c", _JSON_WORKER, str(path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["plan_peak"] < size / 5, (got["plan_peak"], size)
    assert got["read_peak"] < size / 5, (got["read_peak"], size)
    n = len(got["origins"])
    first = int(got["origins"][0].rsplit("#", 1)[1])
    assert n == 64 and got["records"] == records[first:first + n]


def test_json_array_rows_equal_the_parsed_array_and_a_broken_element_is_one_bad_row(tmp_path, tok):
    from llmtrain.data import sample_worker

    records = demo_records(700)
    elements = [json.dumps(r) for r in records]
    elements[5] = '{"messages": [tru]}'  # malformed inside, the array's structure intact
    elements[9] = "[1, 2]"  # not an object
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n".join(elements) + "\n]\n")
    store, report = prepared_split(request(str(tmp_path / "cache"), str(path), chunk_rows=64), tok)
    assert [(b.origin, b.reason.split(" (")[0]) for b in report.bad] == [
        (f"{path}:#5", "bad JSON"), (f"{path}:#9", "row is not a JSON object")]
    assert_store_equals(store, tok, [r for i, r in enumerate(records) if i not in (5, 9)])
    assert not sample_worker._W  # the in-process worker state (reader, tokenizer) is gone after preparation


# --------------------------------------------------------------------------- 3. chunk count, O(1) opens


class _FileCalls:
    """Counts every call that opens or stats a file (what costs a metadata round trip on Lustre/NFS)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for mod, name in ((builtins, "open"), (os, "open"), (os, "stat"), (os, "lstat"), (os, "listdir"),
                          (os, "scandir")):
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name)))

    def _wrap(self, real):
        def call(*a, **k):
            self.n += 1
            return real(*a, **k)
        return call


def test_chunks_are_sized_per_split_and_a_prepared_split_opens_with_o1_files(tmp_path, tok, monkeypatch):
    """Chunks per split follow the number of tokenizer processes (not ~1024 per file), each file is
    scanned once, and opening the prepared split (and its bad-row report) reads a constant number of
    files, whatever its number of chunks."""
    from llmtrain.data import line_cuts
    from llmtrain.data.prepare_samples import report_of
    from llmtrain.data.samples import SampleStore

    records = demo_records(1200)
    paths = []
    for f in range(4):  # 4 files of 300 rows, one bad line each
        lines = [json.dumps(r) for r in records[f * 300:(f + 1) * 300]]
        lines[17] = "{broken"
        paths.append(tmp_path / f"part{f}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    scans = []
    real_cuts = line_cuts.jsonl_cuts
    monkeypatch.setattr(line_cuts, "jsonl_cuts", lambda p, k: scans.append(p) or real_cuts(p, k))
    req = Request("data.train", [SourceConfig(str(tmp_path / "part*.jsonl"))], EncodeSpec("sft", 96), "tok",
                  str(tmp_path / "cache"), workers=1, max_bad_fraction=0.2)
    store, report = prepared_split(req, tok)
    n_chunks = len(store.manifest["chunks"])
    assert n_chunks <= 8 * 1 + len(paths) - 1, n_chunks  # CHUNKS_PER_WORKER x workers (+ file ends)
    assert sorted(scans) == sorted(map(str, paths))  # one newline scan per file
    assert len(report.bad) == 4

    small = Request("data.train", [SourceConfig(str(tmp_path / "part*.jsonl"))], EncodeSpec("sft", 96), "tok",
                    str(tmp_path / "cache-small"), chunk_rows=50, workers=1, max_bad_fraction=0.2)
    many, _ = prepared_split(small, tok)  # 24 chunks
    assert len(many.manifest["chunks"]) == 24
    for s in (store, many):
        calls = _FileCalls(monkeypatch)
        opened = SampleStore(s.dir)
        rep = report_of(opened)
        assert calls.n <= 4, calls.n  # manifest, index, bad-row list: not per chunk
        monkeypatch.undo()
        assert [(b.origin, b.reason) for b in rep.bad] == [(b.origin, b.reason) for b in report.bad]
        assert_store_equals(opened, tok, [r for i, r in enumerate(records) if i % 300 != 17])


def test_bad_row_budget_is_counted_per_chunk_not_rebuilt(tmp_path, tok, monkeypatch):
    """The budget check after each finished chunk must not rebuild the report of all chunks so far
    (O(chunks^2): ~24 CPU-minutes at 100k chunks). Count the BadRow objects made: O(bad rows)."""
    from llmtrain.data.sources import BadRow

    lines = [json.dumps(r) for r in demo_records(1500)]
    for i in range(0, 1500, 50):
        lines[i + 3] = "{broken"  # one bad row in every 50-row chunk: 30 in all
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    made = []
    real_init = BadRow.__init__
    monkeypatch.setattr(BadRow, "__init__", lambda self, *a, **k: made.append(1) or real_init(self, *a, **k))
    store, report = prepared_split(request(str(tmp_path / "cache"), str(path), chunk_rows=50), tok)
    assert len(store.manifest["chunks"]) == 30 and len(report.bad) == 30
    assert len(made) <= 3 * 30, len(made)  # read once, reported once (+ slack), never once per chunk so far


# --------------------------------------------------------------------------- 7. concurrent jobs, one cache


_JOB = r"""
import sys, time
from transformers import AutoTokenizer
from llmtrain.config import SourceConfig
from llmtrain.data import prepare_samples
from llmtrain.data.prepare_samples import EncodeSpec, Request, prepared_split
path, cache, trace, world = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real = prepare_samples.run_chunk

def traced(index, chunk, delay_s=0.0):  # each tokenized chunk leaves a line; slow enough to overlap
    time.sleep(0.3)
    side = real(index, chunk, delay_s)
    with open(trace, "a") as f:
        f.write(f"{prepare_samples.os.getpid()} {index}\n")
    return side

prepare_samples.run_chunk = traced
tok = AutoTokenizer.from_pretrained(sys.argv[5])
# world differs between the jobs: their planners would cut different chunks (the first plan must win)
req = Request("data.train", [SourceConfig(path)], EncodeSpec("sft", 96), "tok", cache, workers=1,
              max_bad_fraction=0.2, world_size=world)
store, _ = prepared_split(req, tok)
print("fingerprint", store.fingerprint(), store.num_seqs)
"""


def test_two_jobs_sharing_a_cache_dir_tokenize_each_chunk_once_and_agree(tmp_path, tok):
    """A sweep: two jobs (two processes with their own rendezvous, i.e. none shared) prepare the same
    split into one data.cache_dir at once. Claims split the work: every chunk is tokenized once, by
    one of them, and both get the same valid split."""
    records = demo_records(1500)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cache, trace = str(tmp_path / "cache"), str(tmp_path / "trace")
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = lambda world: [sys.executable, "-c", _JOB, str(path), cache, trace, str(world), TOKENIZER]  # noqa: E731
    first = subprocess.Popen(cmd(4), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (os.path.exists(trace) and os.path.getsize(trace)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the second job starts while the first is tokenizing
    second = subprocess.Popen(cmd(1), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert all(p.returncode == 0 for p in (first, second)), [o[1][-2000:] for o in outs]
    lines = [line.split() for line in open(trace).read().splitlines()]
    indices = [int(i) for _, i in lines]
    (split,) = [d for d in os.listdir(cache) if d.startswith("sft-")]
    store = prepared_split(request(cache, str(path)), tok)[0]
    assert sorted(indices) == list(range(len(store.manifest["chunks"]))), sorted(indices)  # each exactly once
    assert len({pid for pid, _ in lines}) == 2  # and the work was shared
    assert outs[0][0].split("fingerprint")[1] == outs[1][0].split("fingerprint")[1]
    assert_store_equals(store, tok, records)
    assert not [f for f in os.listdir(os.path.join(cache, split)) if f.endswith(".claim") or ".tmp-" in f]


def test_a_finished_chunk_is_never_replaced(tmp_path):
    """A late writer of a chunk (another job, a taken-over stale claim) must not rename over the files
    an earlier, already-training job has open (NFS: ESTALE on its next read)."""
    from llmtrain.data.samples import ChunkWriter

    seqs = [(np.arange(5, dtype=np.int32), np.array([IGNORE_INDEX, 1, 2, 3, 4], dtype=np.int32))] * 3
    sides, inodes = [], []
    for _ in range(2):
        w = ChunkWriter(str(tmp_path), "c0000000", np.uint16)
        for ids, labels in seqs:
            w.add(ids, labels)
        sides.append(w.finish({"bad": []}))
        inodes.append({f: os.stat(tmp_path / f).st_ino for f in os.listdir(tmp_path) if f.startswith("c0000000")})
    assert inodes[0] == inodes[1] and sides[0] == sides[1]
    assert sorted(os.listdir(tmp_path)) == sorted(inodes[0])  # and the late writer's temporary files are gone


def test_claims_of_dead_owners_are_taken_over_and_live_ones_waited_for(tmp_path, tok, monkeypatch):
    """Claims left by a killed process of this host (dead pid) and by another node's (untouched for
    claims.STALE_S) are taken over at once; a live claim of another node is waited for until it goes
    stale, then taken over, and the split completes."""
    import threading

    from llmtrain.data.prepare_samples import split_dir
    from llmtrain.data.sources import SplitReader

    records = demo_records(400)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    req = request(str(tmp_path / "cache"), str(path), chunk_rows=50)
    directory = split_dir(req, SplitReader(req.srcs, req.key), tok)
    os.makedirs(directory)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"c0000000": {"host": socket.gethostname(), "pid": int(dead.stdout)},  # killed here
              "c0000001": {"host": "node-gone", "pid": 1},  # another node's, silent for an hour
              "c0000002": {"host": "node-busy", "pid": 1}}  # another node's, alive
    for name, owner in owners.items():
        with open(os.path.join(directory, name + ".claim"), "w") as f:
            json.dump({**owner, "launch": "x"}, f)
    old = time.time() - 3600
    os.utime(os.path.join(directory, "c0000001.claim"), (old, old))
    done = []
    worker = threading.Thread(target=lambda: done.append(prepared_split(req, tok)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while len([f for f in os.listdir(directory) if f.endswith(".json") and f.startswith("c")]) < 7:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    assert not done and not os.path.exists(os.path.join(directory, "c0000002.json"))  # the live claim is respected
    os.utime(os.path.join(directory, "c0000002.claim"), (old, old))  # its owner died: no more heartbeats
    worker.join(timeout=120)
    assert done, "preparation never completed"
    store, _ = done[0]
    assert_store_equals(store, tok, records)
    assert not [f for f in os.listdir(directory) if f.endswith(".claim")]


# --------------------------------------------------------------------------- 8. CPU quota


def _fake_cgroups(tmp_path, v2_max: dict, v1: tuple = None) -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for rel, value in v2_max.items():
        d = root / rel.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value + "\n")
    lines = ["0::/kubepods/pod1/c1"]
    if v1:
        d = root / "cpu,cpuacct" / "kubepods"
        d.mkdir(parents=True)
        (d / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (d / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
        lines = ["4:cpu,cpuacct:/kubepods", "1:name=systemd:/x"]
    proc = tmp_path / "proc_cgroup"
    proc.write_text("\n".join(lines) + "\n")
    return str(root), str(proc)


@pytest.mark.parametrize("v2_max,v1,local_ranks,want", [
    ({"/": "max 100000", "kubepods/pod1": "800000 100000", "kubepods/pod1/c1": "max 100000"}, None, 1, 8),
    ({"kubepods/pod1": "800000 100000", "kubepods/pod1/c1": "1600000 100000"}, None, 2, 4),  # tightest, shared
    ({}, (250000, 100000), 1, 2),  # cgroup v1: 2.5 CPUs
    ({"/": "max 100000"}, None, 1, 64),  # no quota: the affinity
])
def test_cgroup_cpu_quota_caps_the_automatic_worker_count(tmp_path, monkeypatch, v2_max, v1, local_ranks, want):
    """A pod limited to 8 CPUs on a 64-CPU host (no cpuset) must not start 64 tokenizer processes."""
    from llmtrain.data.prepare_samples import workers_per_rank

    root, proc = _fake_cgroups(tmp_path, v2_max, v1)
    real_open = builtins.open

    def fake_open(path, *a, **k):  # the cgroup file system and /proc/self/cgroup, from the fake tree
        path = str(path)
        if path == "/proc/self/cgroup":
            path = proc
        elif path.startswith("/sys/fs/cgroup"):
            path = root + path[len("/sys/fs/cgroup"):]
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert workers_per_rank(0, local_ranks) == want
    assert workers_per_rank(3, local_ranks) == 3  # data.prepare_workers wins


# --------------------------------------------------------------------------- 9. cache key


def test_copies_with_other_mtimes_share_the_preparation_and_other_content_does_not(tmp_path, tok):
    """Node-local copies of the data (same path, same bytes, other mtimes) must share one prepared
    split in a shared cache; a change of content at the same size must not."""
    from llmtrain.data.prepare_samples import split_dir
    from llmtrain.data.sources import SplitReader

    path = tmp_path / "train.jsonl"
    body = "\n".join(json.dumps(r) for r in demo_records(50)) + "\n"
    path.write_text(body)
    req = request(str(tmp_path / "cache"), str(path))
    key = lambda: split_dir(req, SplitReader(req.srcs, req.key), tok)  # noqa: E731
    first = key()
    os.utime(path, (time.time() - 86400, time.time() - 86400))  # the copy on another node
    assert key() == first
    path.write_text(body.replace("a", "b", 1))  # same size, other content
    assert key() != first


# --------------------------------------------------------------------------- 10. reads during training


def _small_store(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in demo_records(1500)) + "\n")
    return prepared_split(request(str(tmp_path / "cache"), str(path), chunk_rows=64), tok)[0]


def test_opening_a_store_raises_the_soft_fd_limit_to_the_hard_one(tmp_path, tok):
    """One descriptor per chunk stays open (LRU): at the common soft limit of 1024 a split of
    thousands of chunks would reopen a file for almost every read."""
    import resource

    from llmtrain.data.samples import SampleStore

    store = _small_store(tmp_path, tok)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard fd limit {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        SampleStore(store.dir)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


def test_each_steps_reads_are_in_file_order(tmp_path, tok, monkeypatch):
    """A step's sequences are read in one ascending pass over the chunk files (not in the shuffled
    order of its rows): sequential reads on a network file system instead of random ones."""
    import torch

    from llmtrain.config import load_config
    from llmtrain.data.sequences import SequenceData
    from llmtrain.distributed import DistInfo

    store = _small_store(tmp_path, tok)
    cfg = load_config(None, ["model.name_or_path=m", "data.train=[x]", "data.max_seq_len=96", "data.packing=true",
                             "train.micro_batch_size=4", "train.grad_accum=4"])
    data = SequenceData(cfg.data, cfg.train, DistInfo(0, 0, 1, 1, "single", torch.device("cpu"), "gloo"), store, None, 0,
                        unit_weights=lambda s: s.seq_targets())
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append((os.readlink(f"/proc/self/fd/{fd}"), off))
                        or real(fd, bufs, off))
    for _ in range(3):
        reads.clear()
        data.batches(data.next_step())
        ids_reads = reads[0::2]  # each sequence: its ids, then its mask (same file, further on)
        assert len(ids_reads) > 10 and ids_reads == sorted(ids_reads)  # one ascending pass over the chunk files
        assert all(m[0] == i[0] for i, m in zip(reads[0::2], reads[1::2]))


def test_eval_and_reference_batches_hold_no_python_lists_of_the_split():
    """DPO's reference precompute walks the whole train split as eval batches, on every rank: the
    batches must be built as they are used, and still deal every unit once, round-robin."""
    from llmtrain.data.batching import eval_micro_batches, next_fit_bounds

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1001)
    for packing in (False, True):
        bounds = next_fit_bounds(lengths, 128) if packing else np.arange(len(lengths) + 1)
        rows = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]  # the reference, by hand
        for world, mbs in ((1, 4), (3, 2), (4, 5)):
            per_rank = [eval_micro_batches(lengths, packing, 128, mbs, world, r) for r in range(world)]
            assert len({len(b) for b in per_rank}) == 1  # the same number of forwards on every rank
            for r, batches in enumerate(per_rank):
                mine = rows[r::world]
                assert [row for b in batches for row in b] == mine
                assert all(len(b) <= mbs for b in batches)
    tracemalloc.start()
    big = eval_micro_batches(np.full(2_000_000, 50), False, 128, 4, 2, 0)
    n = sum(1 for _ in zip(range(10), big))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 10 and peak < 20 * 2_000_000, peak  # numpy boundaries only (a list per row: > 100 B each)


# --------------------------------------------------------------------------- small ones


def test_writes_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    from llmtrain.data.samples import ChunkWriter, write_json_atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    write_json_atomic(str(tmp_path / "x.json"), {"a": 1})
    assert synced
    synced.clear()
    w = ChunkWriter(str(tmp_path), "c0", np.uint16)
    w.add(np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32))
    w.finish({"bad": []})
    assert len(synced) >= 2  # the chunk's data file and its sidecar


def test_temporary_leftovers_of_dead_writers_go_on_every_node(tmp_path):
    from llmtrain.data.coordination import cleanup_tmp

    host = socket.gethostname()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    names = {"dead_here": f".c1.bin.tmp-{host}-{dead}", "alive_here": f".c2.bin.tmp-{host}-{os.getpid()}",
             "old_elsewhere": ".c3.bin.tmp-node7-123", "fresh_elsewhere": ".c4.bin.tmp-node8-123"}
    for n in names.values():
        (tmp_path / n).write_text("x")
    old = time.time() - 7 * 86400
    os.utime(tmp_path / names["old_elsewhere"], (old, old))
    cleanup_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([names["alive_here"], names["fresh_elsewhere"]])


def test_system_folding_depends_on_the_template_not_on_rows_seen_before(tok, monkeypatch):
    """A template that rejects some system messages only: whether a row's system message is folded
    must not depend on which rows its worker process encoded first (workers see different rows)."""
    import copy

    from llmtrain.data import chat_render
    from llmtrain.data.chat import tokenize_chat

    t = copy.deepcopy(tok)
    t.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'system' and 'X' in m['content'] %}"
        "{{ raise_exception('no such system') }}{%- endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    rejected = [{"role": "system", "content": "X marks"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    fine = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    monkeypatch.setattr(chat_render, "_FOLDS_SYSTEM", {})
    alone = tokenize_chat(t, fine)
    monkeypatch.setattr(chat_render, "_FOLDS_SYSTEM", {})
    tokenize_chat(t, rejected)  # folded, for this row
    after = tokenize_chat(t, fine)
    assert np.array_equal(alone[0], after[0]) and np.array_equal(alone[1], after[1])
    assert "be brief" in t.decode(after[0]) and t.decode(after[0]).count("<|im_start|>") == 3  # not folded


def test_a_tokenizer_without_offsets_is_one_clear_error(tmp_path):
    from llmtrain.config import ConfigError

    class SlowTokenizer:  # a Python tokenizer: no offsets to map assistant spans to tokens
        is_fast = False

    class ClaimsFast:  # a remote-code class that says it is fast but has no Rust backend
        is_fast = True

    for bad in (SlowTokenizer(), ClaimsFast()):
        with pytest.raises(ConfigError, match="not a fast"):
            prepared_split(request(str(tmp_path / "cache"), SFT_DEMO), bad)
