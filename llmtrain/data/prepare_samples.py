"""Tokenize an SFT/DPO split once, in parallel, into a content-keyed directory that every rank reads.

Who does the work: every rank. The split's rows are planned in chunks (sources.Chunk: about
CHUNKS_PER_WORKER chunks per tokenizer process of the launch, at most data.prepare_chunk_rows
rows each), by one process, into plan.json; ranks draw chunk numbers from one counter in the
rendezvous store (`store.add`: each number handed out once, no collective) and tokenize them in
their own worker processes (data.prepare_workers). So preparation scales with the cores of every
node, and no rank waits inside a collective. The rank that draws the number after the last
chunk finishes the split: it waits for the others' chunks (taking over any whose owner died) and
consolidates them into one index (samples.finalize_split); the other ranks poll only for the
manifest, with backoff, and their own timeout (data.prepare_timeout_minutes).
Every rank beats a heartbeat (waiting.Heartbeat, in <split dir>/.llmtrain-wait/) while it
prepares, so a rank of this launch killed while others wait for its plan or manifest ends their
wait within dist.stale_minutes with one line naming it, instead of at the cap; chunks a dead
process had claimed are taken over by the finisher (claims).

Where it lives: <data.cache_dir or output_dir/cache>/<sft|dpo>-<key>/, where the key hashes
everything the samples depend on (source files' paths, sizes and a hash of their first and last
MiB, or a hub dataset's fingerprint; format/columns/subset/split, tokenizer and chat template,
length settings, the encoding code). Any later run, and launch/inspect_data.py, with the same
inputs reuses it; a shared data.cache_dir serves many runs, and jobs preparing into it at the same
time split the work through per-chunk claims (llmtrain.data.claims) instead of each doing all of
it. Node-local copies of the data share the key, so a shared cache directory is prepared once.

Resume: a chunk is written under temporary names and published (first-wins, never replaced) with
its sidecar last, so an interrupted preparation keeps every finished chunk and a rerun does only
the rest. The sample order is the chunk order (= the rows' file order) whatever the number of
workers, ranks or jobs, and the bad-row report lists the same rows, in file order, as a single
process would.
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
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from ..distributed import waiting
from ..errors import ConfigError
from .claims import CLAIM_EXT, Claims, owner_of
from .coordination import SAY_EVERY_S, ChunkCounter, default_store, say, storage_id, wait_for
from .cpu_quota import usable_cpus
from .files import cleanup_tmp, publish_json_once, write_json_atomic
from .sample_worker import EncodeSpec, chunk_name, clear_worker, init_worker, run_chunk  # noqa: F401 (EncodeSpec: API)
from .samples import FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, PAYLOADS_NAME, VALUES_NAME, SampleStore, SampleStoreError, chunk_done, finalize_split, read_bad_rows
from .shards.store import dtype_for_vocab
from .sources import BadRow, BadRowReport, Chunk, DataError, SplitReader

PLAN_NAME, FAILED_NAME = "plan.json", "failed.json"
CHUNKS_PER_WORKER = 8  # chunks per tokenizer process: balance (the last chunk's tail) vs files and bookkeeping
SWEEP_POLL_S = 5.0  # how often the finishing rank looks for missing chunks whose owner died
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
    timeout_s: float = 24 * 3600.0  # data.prepare_timeout_minutes (0 = no cap)
    stale_s: float = 600.0  # dist.stale_minutes: a rank whose heartbeat stops this long is gone
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


_ENCODING_MODULES = ("chat.py", "chat_render.py", "chat_spans.py", "sft.py", "preference.py", "prompts.py", "sources.py", "samples.py",
                     "sample_worker.py", "prepare_samples.py", "json_array.py")


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
    CPUs; an unbound rank gets an equal share of the node's CPUs with the other ranks on the node.
    A cgroup CPU quota (a Kubernetes CPU limit) caps the CPUs first: 8 CPUs of quota on a 224-CPU
    host are 8, not 224 (cpu_quota.usable_cpus)."""
    if requested > 0:
        return requested
    cpus, bound = usable_cpus()
    if not bound:
        cpus //= max(1, local_world_size)
    return max(1, cpus)


# --------------------------------------------------------------------------- one rank's part


@dataclass
class _State:
    """What one rank knows while it prepares: finished chunks' sidecars and running bad-row counters
    (O(1) per finished chunk: the budget check never rebuilds a report)."""

    directory: str
    chunks: list
    dtype: str
    planned_rows: int
    sides: dict = field(default_factory=dict)  # index -> sidecar
    bad_rows: int = 0

    def add(self, i: int, side: dict) -> None:
        if i not in self.sides:
            self.sides[i] = side
            self.bad_rows += len(side["bad"])

    def complete(self) -> bool:
        return len(self.sides) == len(self.chunks)

    def missing(self) -> list[int]:
        return [i for i in range(len(self.chunks)) if i not in self.sides]

    def refresh(self, indices) -> None:
        for i in indices:
            side = chunk_done(self.directory, chunk_name(i), self.dtype)
            if side is not None:
                self.add(i, side)

    def report(self) -> BadRowReport:
        """The bad rows known so far, in file order (built once, when the budget is exceeded)."""
        sides = [self.sides[i] for i in sorted(self.sides)]
        rep = BadRowReport(total=sum(s["rows"] for s in sides))
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
        self.workers = workers_per_rank(req.workers, req.local_world_size)
        self.started = time.time()
        beats = os.path.join(directory, waiting.MARKERS)
        self.heartbeat = waiting.Heartbeat(beats, f"prepare-{self.token}", self.rank, req.stale_s)
        self.liveness = waiting.Liveness(beats, f"prepare-{self.token}", req.stale_s) if req.world_size > 1 else None

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
        """The plan in place (first planner wins: concurrent jobs of one cache directory agree on it)."""
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
        if self.counter.draw("planner") == 0:  # one process of this launch scans the sources; the others read
            target = CHUNKS_PER_WORKER * self.workers * self.req.world_size
            try:
                ours = self.reader.plan(self.req.chunk_rows, target, stage_dir=self.dir)
            except BaseException as e:  # e.g. a column that is not there: the ranks waiting for the plan must hear it
                self._record_error(e)
                raise
            publish_json_once(path, {"chunks": [asdict(c) for c in ours]})
            chunks = read()
            for staged in {c.staged for c in ours} - {c.staged for c in chunks} - {""}:
                os.remove(staged)  # another job's planner won: its plan, its staged copies
            return chunks
        return wait_for(read, lambda: f"the plan of {self.req.key} ({path})", self.req.timeout_s, self._failed,
                        self.rank, self.liveness, f"prepare {self.req.key}")

    # --- tokenize ---
    def run(self) -> SampleStore:
        if self.liveness is None:  # one process: nobody waits for it
            return self._run()
        with self.heartbeat:  # until this rank is done: the plan, its chunks, maybe the manifest
            return self._run()

    def _run(self) -> SampleStore:
        chunks = self.plan()
        self.num_chunks = len(chunks)
        st = _State(self.dir, chunks, self.dtype, sum(c.row_stop - c.row_start for c in chunks))
        if self.rank == 0:
            say(0, f"{self.req.key}: {len(chunks)} chunk(s) of <= {self.req.chunk_rows} rows -> {self.dir} "
                    f"({self.req.world_size} rank(s) x {self.workers} worker(s))")
        claims = Claims(self.dir, self.token)
        try:
            with _Workers(self, self.workers) as workers:
                self._draw_and_tokenize(st, workers, claims)
                if self._finisher:  # drew the number after the last chunk: this rank completes the split
                    self._complete(st, workers, claims)
                    self._write_manifest(st)
        except (DataError, ConfigError, waiting.WaitError, KeyboardInterrupt):
            raise
        except BaseException as e:  # tell the other ranks, then fail here too
            self._record_error(e)
            raise
        finally:
            claims.stop()  # unfinished chunks' claims go: another process may take them at once
        if not self._finisher:
            manifest = os.path.join(self.dir, MANIFEST_NAME)
            wait_for(lambda: os.path.exists(manifest), self._describe_manifest_wait, self.req.timeout_s, self._failed,
                     self.rank, self.liveness, f"prepare {self.req.key}")  # only the manifest is polled (with backoff)
        return SampleStore(self.dir)

    def _test_arrive(self) -> None:
        _test_arrive_and_wait(self.counter, self.req.world_size, wait=bool(_test_delays(self.rank)))

    def _draw_and_tokenize(self, st: _State, workers: "_Workers", claims: Claims) -> None:
        """Draw chunk numbers until none is left and tokenize those not finished or claimed by others."""
        delays = _test_delays(self.rank)
        if os.environ.get(TEST_DELAY_ENV):
            self._test_arrive()
        self._finisher = False

        def drawn() -> Iterator[tuple[int, Chunk, float]]:
            while True:
                self._failed()
                i = self.counter.draw()
                if i >= len(st.chunks):
                    self._finisher = i == len(st.chunks)
                    return
                st.refresh([i])
                if i in st.sides or not claims.take(chunk_name(i)):
                    continue  # finished by an earlier preparation, or being tokenized by another job
                yield i, st.chunks[i], delays.pop(0) if delays else 0.0

        for i, side in workers.run(drawn()):
            self._finished(st, i, side, claims)

    def _finished(self, st: _State, i: int, side: dict, claims: Claims) -> None:
        st.add(i, side)
        claims.release(chunk_name(i))
        if not st.complete() and st.bad_rows > self.req.max_bad_fraction * st.planned_rows:
            # the bad rows seen already exceed the budget of the whole split (the final share can
            # only be higher): stop, and leave the verdict for the other ranks and later attempts
            rep = st.report()
            self._record_failure({"kind": "bad_rows", "rows": rep.total, "planned_rows": st.planned_rows,
                                  "bad": [[b.origin, b.reason] for b in rep.bad]})
            raise TooManyBadRows(rep, complete=False)

    def _complete(self, st: _State, workers: "_Workers", claims: Claims) -> None:
        """Wait for the chunks other processes tokenize; take over those whose claim went stale (its
        owner died: another job's rank, or one of this launch killed by the OOM killer)."""
        while True:
            def sweep():
                st.refresh(st.missing())
                if st.complete():
                    return "done"
                return [i for i in st.missing() if not self._ours(i) and claims.take(chunk_name(i))] or None

            found = wait_for(sweep, lambda: self._describe_missing(st), self.req.timeout_s, self._failed, self.rank,
                             self.liveness, f"prepare {self.req.key}", max_poll_s=SWEEP_POLL_S)
            if found == "done":
                return
            for i, side in workers.run((i, st.chunks[i], 0.0) for i in found):
                self._finished(st, i, side, claims)

    def _ours(self, i: int) -> bool:
        """Chunk i is claimed by another rank of this launch: never taken over, even if its owner died,
        because this launch cannot train without that rank anyway; the heartbeats (self.liveness) end
        the wait with one line naming it. Claims of other jobs' dead processes are taken over."""
        if self.liveness is None:
            return False
        owner = owner_of(os.path.join(self.dir, chunk_name(i) + CLAIM_EXT))
        return bool(owner) and owner.get("launch") == self.token and owner.get("pid") != os.getpid()

    def _describe_missing(self, st: _State) -> str:
        names = [chunk_name(i) for i in st.missing()]
        owners = []
        for n in names[:3]:
            o = owner_of(os.path.join(self.dir, n + CLAIM_EXT))
            owners.append(f"{n} ({o['host']} pid {o['pid']})" if o else n)
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        return (f"chunk(s) of {self.req.key} that other processes are preparing in {self.dir}: "
                f"{len(names)} not finished: {', '.join(owners)}{more}")

    def count_finished(self) -> int:
        """Finished chunks of every process (one directory listing: for progress lines, not polls)."""
        return sum(1 for f in os.listdir(self.dir) if f.startswith("c") and f.endswith(".json"))

    def _describe_manifest_wait(self) -> str:
        return f"the manifest of {self.req.key} in {self.dir} ({self.count_finished()} chunk(s) finished so far)"

    def _write_manifest(self, st: _State) -> None:
        sides = [st.sides[i] for i in range(len(st.chunks))]
        extra = {"kind": self.req.spec.kind,
                 "prepare": {"seconds": round(time.time() - self.started, 3), "ranks": self.req.world_size,
                             "workers_per_rank": self.workers, "finished_by": f"rank {self.rank} ({socket.gethostname()})"}}
        manifest = finalize_split(self.dir, sides, self.req.spec.seqs_per_unit, self.dtype, extra,
                                  unit_values=self.req.spec.value_column is not None, payloads=self.req.spec.payloads)
        if os.path.exists(os.path.join(self.dir, FAILED_NAME)):
            os.remove(os.path.join(self.dir, FAILED_NAME))  # an earlier verdict under a lower data.max_bad_fraction
        cleanup_tmp(self.dir)
        for f in os.listdir(self.dir):  # every chunk is finished: no claim means anything any more
            if f.endswith(CLAIM_EXT):
                try:
                    os.remove(os.path.join(self.dir, f))
                except FileNotFoundError:
                    pass
        say(self.rank, f"{self.req.key}: prepared {manifest['rows']:,} rows -> {manifest['num_seqs']:,} sequences, "
                        f"{manifest['num_tokens']:,} tokens in {manifest['prepare']['seconds']:.1f} s")


class _Workers:
    """This rank's tokenizer processes (spawned: safe with the threads a rank already runs, gloo and
    tokenizers), or this process itself for one worker."""

    def __init__(self, prep: _Preparer, n: int):
        self.prep, self.n = prep, n
        self.pool = None
        args = (prep.reader, prep.req.spec, prep.dir, prep.dtype)
        if n > 1:
            self.pool = cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=init_worker,
                                               initargs=(prep.tok, *args, True))
        else:
            init_worker(prep.tok, *args, False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is None:
            clear_worker()  # the reader and tokenizer must not stay referenced from a module global all run
            return
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()  # idle now, or on error / Ctrl-C mid-chunk: finished chunks stay, the rest is redone

    def run(self, items) -> Iterator[tuple[int, dict]]:
        """(index, sidecar) of each item (index, chunk, delay) as it finishes; items are pulled only
        when a worker is free (so a rank draws chunk numbers at the pace it tokenizes)."""
        items, running, exhausted, last_say = iter(items), {}, False, time.monotonic()
        while True:
            while not exhausted and len(running) < self.n:
                item = next(items, None)
                if item is None:
                    exhausted = True
                elif self.pool is None:  # one worker: tokenize in this process, no spawn
                    yield item[0], run_chunk(*item)
                else:
                    running[self.pool.submit(run_chunk, *item)] = item[0]
            if not running:
                if exhausted:
                    return
                continue
            done, _ = cf.wait(list(running), timeout=SAY_EVERY_S, return_when=cf.FIRST_COMPLETED)
            for f in done:
                i = running.pop(f)
                try:
                    side = f.result()
                except BrokenProcessPool as e:
                    raise DataError(f"{self.prep.req.key}: a tokenizer worker process died ({e}); it may have run "
                                    "out of memory (set data.prepare_workers lower) or failed to load the tokenizer "
                                    "(set data.prepare_workers=1 to tokenize in the rank itself)") from None
                yield i, side
            if self.prep.rank == 0 and time.monotonic() - last_say >= 30:
                say(0, f"{self.prep.req.key}: {self.prep.count_finished()}/{self.prep.num_chunks} chunks finished")
                last_say = time.monotonic()


def _test_arrive_and_wait(counter: ChunkCounter, world_size: int, wait: bool) -> None:
    """Test hook (TEST_DELAY_ENV): register this rank; the delayed rank waits (<= 120 s) until every
    rank has arrived, so a slow-starting rank cannot miss the stall the test is about."""
    counter.draw("test-arrived")
    deadline = time.monotonic() + 120
    while wait and counter.store is not None and time.monotonic() < deadline:
        if int(counter.store.add(f"{counter.name}/test-arrived", 0)) >= world_size:
            return
        time.sleep(0.1)


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
    fast = getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")
    if not fast and req.spec.kind != "rl":  # RL prompts mask nothing
        raise ConfigError(f"{req.key}: the tokenizer ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; "
                          "assistant masking needs its character offsets (use a model with a tokenizer.json)")
    reader = SplitReader(req.srcs, req.key)
    directory = split_dir(req, reader, tokenizer)
    store = _open_if_prepared(directory)
    if store is None:
        store = _Preparer(req, tokenizer, reader, directory).run()
    rep = report_of(store)
    if rep.total and len(rep.bad) / rep.total > req.max_bad_fraction:
        raise TooManyBadRows(rep, complete=True)
    return store, rep


def open_prepared(req: Request, tokenizer) -> Optional[SampleStore]:
    """The split if it is prepared already (nothing is tokenized), else None."""
    return _open_if_prepared(split_dir(req, SplitReader(req.srcs, req.key), tokenizer))


def _open_if_prepared(directory: str) -> Optional[SampleStore]:
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return None
    try:
        return SampleStore(directory)
    except SampleStoreError as e:
        # finished files are never replaced, so the damaged consolidated ones move aside (chunks stay)
        print(f"warning: {e}; preparing it again", file=sys.stderr, flush=True)
        for name in (MANIFEST_NAME, INDEX_NAME, VALUES_NAME, PAYLOADS_NAME):
            try:
                os.replace(os.path.join(directory, name), os.path.join(directory, f"{name}.damaged-{os.getpid()}"))
            except FileNotFoundError:
                pass
        return None


def report_of(store: SampleStore) -> BadRowReport:
    """The bad-row report of a prepared split, from its consolidated bad_rows.jsonl (one file), in file order."""
    m = store.manifest
    rep = BadRowReport(total=m["rows"], dropped_too_long=m["dropped_too_long"])
    if m["bad_rows"]:
        rep.bad = [BadRow(o, r) for o, r in read_bad_rows(store.dir)]
    return rep
