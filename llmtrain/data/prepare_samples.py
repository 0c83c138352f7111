"""Tokenize an SFT/DPO split once, in parallel, into a content-keyed directory that every rank reads.

Who does the work: every rank. The split's rows are planned in chunks (sources.Chunk, at most
data.prepare_chunk_rows rows each); ranks draw chunk numbers from one counter in the rendezvous
store (`store.add`: each number handed out once, no collective) and tokenize them in their own
worker processes (data.prepare_workers). So preparation scales with the cores of every node, and
no rank waits inside a collective: a rank that runs out of chunks polls the directory for the
others' chunks with its own timeout (data.prepare_timeout_minutes) and says what it waits for.

Where it lives: <data.cache_dir or output_dir/cache>/<sft|dpo>-<key>/, where the key hashes
everything the samples depend on (source files' paths, sizes and mtimes or datasets'
fingerprints, format/columns/subset/split, tokenizer and chat template, length settings, the
encoding code). Any later run, and launch/inspect_data.py, with the same inputs reuses it; a
shared data.cache_dir serves many runs. The directory should be on storage every rank sees, as
output_dir is; if each node has its own copy of the path (node-local disk), ranks that share a
copy share the work and every node prepares the whole split once.

Resume: a chunk is written under temporary names and renamed into place with its sidecar last,
so an interrupted preparation keeps every finished chunk and a rerun does only the rest. The
sample order is the chunk order (= the rows' file order) whatever the number of workers or ranks,
and the bad-row report lists the same rows, in file order, as a single process would.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from .coordination import SAY_EVERY_S, ChunkCounter, cleanup_tmp, default_store, say, storage_id, wait_for
from .sample_worker import EncodeSpec, chunk_name, init_worker, run_chunk  # noqa: F401  (EncodeSpec: API)
from .samples import (FORMAT_VERSION, MANIFEST_NAME, SampleStore, SampleStoreError, chunk_done, data_fingerprint,
                      write_json_atomic)
from .shards.store import dtype_for_vocab
from .sources import BadRow, BadRowReport, Chunk, DataError, SplitReader

PLAN_NAME, FAILED_NAME = "plan.json", "failed.json"
# test hook, "RANK:SECONDS[:AFTER]": that rank stalls SECONDS in the chunk after its first AFTER (default 0) chunks
TEST_DELAY_ENV = "LLMTRAIN_TEST_PREPARE_DELAY"


@dataclass
class Request:
    key: str  # "data.train" / "data.eval": for messages
    srcs: list
    spec: EncodeSpec
    tok_hash: str  # the run's tokenizer identity (chat template included)
    cache_root: str
    chunk_rows: int = 4096
    workers: int = 0  # per rank; 0 = automatic
    timeout_s: float = 4 * 3600.0
    max_bad_fraction: float = 0.001
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


class TooManyBadRows(DataError):
    """More malformed rows than data.max_bad_fraction allows; carries the report (maybe partial)."""

    def __init__(self, report: BadRowReport, complete: bool):
        super().__init__(report.summary())
        self.report, self.complete = report, complete


# --------------------------------------------------------------------------- identity and layout


_ENCODING_MODULES = ("chat.py", "chat_render.py", "chat_spans.py", "sft.py", "preference.py", "sources.py", "samples.py", "sample_worker.py",
                     "prepare_samples.py")


def _code_hash() -> str:
    """The code that turns rows into samples: a change to it must not reuse old samples."""
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _ENCODING_MODULES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def split_dir(req: Request, reader: SplitReader, tokenizer) -> str:
    # special tokens: a template may render {{ eos_token }}, which the backend's hash does not cover
    special = sorted((k, str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items())
    ident = {"format": FORMAT_VERSION, "spec": asdict(req.spec), "tokenizer": [req.tok_hash, special, len(tokenizer)],
             "sources": reader.identity(), "chunk_rows": req.chunk_rows, "code": _code_hash()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return os.path.join(req.cache_root, f"{req.spec.kind}-{key}")


def workers_per_rank(requested: int, local_world_size: int) -> int:
    """data.prepare_workers, or: a rank bound to a CPU subset (Slurm --cpus-per-task) uses its own
    CPUs; an unbound rank gets an equal share of the node's CPUs with the other ranks on the node."""
    if requested > 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus >= (os.cpu_count() or cpus):
        cpus //= max(1, local_world_size)
    return max(1, cpus)


# --------------------------------------------------------------------------- one rank's part


@dataclass
class _State:
    """What one rank knows while it prepares: finished chunks' sidecars and its bad-row tally."""

    directory: str
    chunks: list
    dtype: str
    planned_rows: int
    sides: dict = field(default_factory=dict)  # index -> sidecar

    def missing(self) -> list[int]:
        return [i for i in range(len(self.chunks)) if i not in self.sides]

    def refresh(self, indices) -> None:
        for i in indices:
            side = chunk_done(self.directory, chunk_name(i), self.dtype)
            if side is not None:
                self.sides[i] = side

    def report(self) -> BadRowReport:
        sides = [self.sides[i] for i in sorted(self.sides)]
        rep = BadRowReport(total=sum(s["rows"] for s in sides),
                           dropped_too_long=sum(s["dropped_too_long"] for s in sides))
        rep.bad = [BadRow(o, r) for s in sides for o, r in s["bad"]]
        return rep


class _Preparer:
    def __init__(self, req: Request, tokenizer, reader: SplitReader, directory: str):
        self.req, self.tok, self.reader, self.dir = req, tokenizer, reader, directory
        self.rank = req.rank
        store = default_store()
        os.makedirs(directory, exist_ok=True)
        self.counter = ChunkCounter(f"llmtrain-prepare/{os.path.basename(directory)}/{storage_id(directory)}", store)
        self.token = self.counter.launch_token()
        self.dtype = dtype_for_vocab(len(tokenizer)).name
        self.started = time.time()

    # --- failures other ranks must hear about ---
    def _failed(self) -> None:
        try:
            with open(os.path.join(self.dir, FAILED_NAME)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return
        if info.get("kind") == "bad_rows" and len(info["bad"]) > self.req.max_bad_fraction * info["planned_rows"]:
            rep = BadRowReport(total=info["rows"], bad=[BadRow(o, r) for o, r in info["bad"]])
            raise TooManyBadRows(rep, complete=False)
        if info.get("kind") == "error" and info.get("launch") == self.token:
            raise DataError(f"{self.req.key}: preparation failed on {info['where']}: {info['message']}")

    def _record_failure(self, info: dict) -> None:
        write_json_atomic(os.path.join(self.dir, FAILED_NAME), info)

    def _record_error(self, e: BaseException) -> None:
        """This launch's other ranks stop waiting and fail with the same message (see _failed)."""
        self._record_failure({"kind": "error", "launch": self.token, "where": f"rank {self.rank} "
                              f"({socket.gethostname()})", "message": f"{type(e).__name__}: {e}"})

    # --- plan ---
    def plan(self) -> list[Chunk]:
        path = os.path.join(self.dir, PLAN_NAME)

        def read():
            try:
                with open(path) as f:
                    return [Chunk(**c) for c in json.load(f)["chunks"]]
            except (OSError, ValueError, KeyError, TypeError):
                return None

        chunks = read()
        if chunks is not None:
            return chunks
        if self.counter.draw("planner") == 0:  # one process scans the sources; the others read its plan
            try:
                chunks = self.reader.plan(self.req.chunk_rows)
            except BaseException as e:  # e.g. a column that is not there: the ranks waiting for the plan must hear it
                self._record_error(e)
                raise
            write_json_atomic(path, {"chunks": [asdict(c) for c in chunks]})
            return chunks
        return wait_for(read, lambda: f"the plan of {self.req.key} ({path})", self.req.timeout_s, self._failed,
                        self.rank)

    # --- tokenize ---
    def run(self) -> SampleStore:
        chunks = self.plan()
        st = _State(self.dir, chunks, self.dtype, sum(c.row_stop - c.row_start for c in chunks))
        workers = workers_per_rank(self.req.workers, self.req.local_world_size)
        if self.rank == 0:
            say(0, f"{self.req.key}: {len(chunks)} chunk(s) of <= {self.req.chunk_rows} rows -> {self.dir} "
                    f"({self.req.world_size} rank(s) x {workers} worker(s))")
        writer = self._tokenize(st, workers)
        if writer:  # drew the number after the last chunk: this rank writes the manifest
            self._wait(st, "chunk(s)", lambda: not st.missing(), st.missing)
            self._write_manifest(st, workers)
        else:
            self._wait(st, "the manifest", lambda: os.path.exists(os.path.join(self.dir, MANIFEST_NAME)), st.missing)
        return SampleStore(self.dir)

    def _tokenize(self, st: _State, workers: int) -> bool:
        """Draw and tokenize chunks until none is left; True when this rank drew the one-past-the-end number."""
        delays = _test_delays(self.rank)
        pool = None
        if workers > 1:  # spawn: safe with the threads a rank already runs (gloo, tokenizers)
            pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                                          initargs=(self.tok, self.reader, self.req.spec, self.dir, self.dtype, True))
        else:
            init_worker(self.tok, self.reader, self.req.spec, self.dir, self.dtype, False)
        running: dict = {}
        writer, exhausted, last_say = False, False, time.monotonic()
        try:
            while True:
                while not exhausted and len(running) < workers:
                    self._failed()
                    i = self.counter.draw()
                    if i >= len(st.chunks):
                        exhausted, writer = True, i == len(st.chunks)
                        break
                    st.refresh([i])
                    if i in st.sides:  # finished by an earlier (interrupted) preparation
                        continue
                    args = (i, st.chunks[i], delays.pop(0) if delays else 0.0)
                    if pool is None:  # one worker: tokenize in this process, no spawn
                        st.sides[i] = run_chunk(*args)
                        self._check_bad_rows(st)
                    else:
                        running[i] = pool.submit(run_chunk, *args)
                if not running:
                    if exhausted:
                        return writer
                    continue
                done, _ = cf.wait(list(running.values()), timeout=SAY_EVERY_S, return_when=cf.FIRST_COMPLETED)
                for i in [i for i, f in running.items() if f in done]:
                    st.sides[i] = running.pop(i).result()
                    self._check_bad_rows(st)
                if self.rank == 0 and time.monotonic() - last_say >= 30:
                    say(0, f"{self.req.key}: {self._count_done(st)}/{len(st.chunks)} chunks done")
                    last_say = time.monotonic()
        except (DataError, KeyboardInterrupt):
            raise
        except BaseException as e:  # tell the other ranks, then fail here too
            self._record_error(e)
            raise
        finally:
            if pool is not None:
                procs = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                for p in procs:
                    p.terminate()  # idle now, or on error / Ctrl-C mid-chunk: finished chunks stay, the rest is redone

    def _count_done(self, st: _State) -> int:
        return sum(1 for f in os.listdir(self.dir) if f.endswith(".json") and f.startswith("c"))

    def _check_bad_rows(self, st: _State) -> None:
        """Stop early when the bad rows seen already exceed the budget of the whole split (the
        final share can only be higher), and leave the verdict for the other ranks."""
        if not st.missing():
            return  # everything is known: the manifest gets written and every rank checks the full report
        rep = st.report()
        if len(rep.bad) > self.req.max_bad_fraction * st.planned_rows:
            self._record_failure({"kind": "bad_rows", "rows": rep.total, "planned_rows": st.planned_rows,
                                  "bad": [[b.origin, b.reason] for b in rep.bad]})
            raise TooManyBadRows(rep, complete=False)

    def _wait(self, st: _State, what: str, ready: Callable[[], bool], missing: Callable[[], list]) -> None:
        def check():
            st.refresh(st.missing())
            return ready()

        def describe():
            names = [chunk_name(i) for i in missing()]
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            return (f"{what} of {self.req.key} that other ranks are preparing in {self.dir}: "
                    f"{len(names)} chunk(s) not finished: {', '.join(names[:3])}{more}")

        wait_for(check, describe, self.req.timeout_s, self._failed, self.rank)

    def _write_manifest(self, st: _State, workers: int) -> None:
        sides = [st.sides[i] for i in range(len(st.chunks))]
        rep = st.report()
        manifest = {
            "format": "llmtrain.samples", "version": FORMAT_VERSION, "kind": self.req.spec.kind,
            "seqs_per_unit": self.req.spec.seqs_per_unit, "dtype": self.dtype,
            "unit_values": self.req.spec.value_column is not None,
            "chunks": [{k: s[k] for k in ("name", "num_seqs", "num_tokens", "sha256")} for s in sides],
            "num_seqs": sum(s["num_seqs"] for s in sides), "num_tokens": sum(s["num_tokens"] for s in sides),
            "rows": rep.total, "bad_rows": len(rep.bad), "dropped_too_long": rep.dropped_too_long,
            "fingerprint": data_fingerprint(self.req.spec.seqs_per_unit, sides),
            "prepare": {"seconds": round(time.time() - self.started, 3), "ranks": self.req.world_size,
                        "workers_per_rank": workers, "finished_by": f"rank {self.rank} ({socket.gethostname()})"},
        }
        write_json_atomic(os.path.join(self.dir, MANIFEST_NAME), manifest)  # last: the split is complete
        if os.path.exists(os.path.join(self.dir, FAILED_NAME)):
            os.remove(os.path.join(self.dir, FAILED_NAME))  # an earlier verdict under a lower data.max_bad_fraction
        cleanup_tmp(self.dir)
        say(self.rank, f"{self.req.key}: prepared {manifest['rows']:,} rows -> {manifest['num_seqs']:,} sequences, "
                        f"{manifest['num_tokens']:,} tokens in {manifest['prepare']['seconds']:.1f} s")


def _test_delays(rank: int) -> list[float]:
    """Sleep before each of this rank's chunks (TEST_DELAY_ENV; empty outside tests)."""
    parts = os.environ.get(TEST_DELAY_ENV, "").split(":")
    if len(parts) < 2 or int(parts[0]) != rank:
        return []
    after = int(parts[2]) if len(parts) > 2 else 0
    return [0.0] * after + [float(parts[1])]


# --------------------------------------------------------------------------- entry point


def prepared_split(req: Request, tokenizer) -> tuple[SampleStore, BadRowReport]:
    """The split's samples, prepared now (together with the other ranks) or earlier; and its bad-row
    report. Raises TooManyBadRows above data.max_bad_fraction (every rank raises it)."""
    reader = SplitReader(req.srcs, req.key)
    directory = split_dir(req, reader, tokenizer)
    store = _open_if_prepared(directory)
    if store is None:
        store = _Preparer(req, tokenizer, reader, directory).run()
    rep = report_of(store)
    if rep.total and len(rep.bad) / rep.total > req.max_bad_fraction:
        raise TooManyBadRows(rep, complete=True)
    return store, rep


def _open_if_prepared(directory: str) -> Optional[SampleStore]:
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return None
    try:
        return SampleStore(directory)
    except SampleStoreError as e:
        print(f"warning: {e}; preparing it again", file=sys.stderr, flush=True)
        return None


def report_of(store: SampleStore) -> BadRowReport:
    """The bad-row report of a prepared split, rebuilt from its chunks' sidecars, in file order."""
    m = store.manifest
    rep = BadRowReport(total=m["rows"], dropped_too_long=m["dropped_too_long"])
    if m["bad_rows"]:
        for c in m["chunks"]:
            with open(os.path.join(store.dir, c["name"] + ".json")) as f:
                rep.bad += [BadRow(o, r) for o, r in json.load(f)["bad"]]
    return rep
