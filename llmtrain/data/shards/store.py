"""On-disk token shards for pretraining: format, reader, and the fixed-length row sampler.

Layout of a prepared directory (written by `data.shards.prepare.prepare_corpus`):

    manifest.json            written last, atomically: tokenizer identity, dtype, shard list, totals
    <shard>.bin              flat token ids (uint16 when vocab_size <= 65536, else uint32), native
                             little-endian, an EOS id after every document
    <shard>.idx.npy          int64 token offsets (within the shard) where each document starts
    <shard>.json             sidecar: counts, sha256 of .bin and .idx.npy, source file and row range;
                             its presence marks the shard as finished (it is replaced in last)

Token reads use pread into the returned array and the document indexes are np.memmap'd (binary
search), so process memory does not grow with corpus size; see TokenShards.tokens for why the
tokens are not memmapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ...errors import LlmtrainError
from ..labels import IGNORE_INDEX

FORMAT_NAME = "llmtrain.token_shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PREPARE_HINT = "re-run `llmtrain prepare --recipe R` (python launch/prepare.py; finished shards are kept)"


class ShardError(LlmtrainError):
    """A prepared shard directory is missing, damaged, or does not match the run."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1, so a vocab of exactly 65536 still fits uint16
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # before the rename: a crash must not publish a name with lost blocks
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


@dataclass
class ShardInfo:
    name: str  # file stem: <name>.bin, <name>.idx.npy, <name>.json
    num_tokens: int
    num_docs: int
    sha256: str  # of the .bin bytes
    idx_sha256: str  # of the .idx.npy file
    source: str  # source file (or first file of a group of .txt files)
    row_start: int  # first row (line / record / file) of the source in this shard, 0-based
    row_stop: int  # one past the last row


@dataclass
class Manifest:
    tokenizer_name_or_path: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: str  # "uint16" or "uint32"
    text_field: str
    shards: list[ShardInfo]
    total_tokens: int
    total_docs: int
    total_rows: int  # rows read from the sources (lines, records, .txt documents)
    skipped_rows: int  # bad_rows + empty_rows
    bad_rows: int  # non-UTF-8, invalid JSON, missing or non-string text field
    empty_rows: int  # empty text (not an error)
    empty_files: list[str] = field(default_factory=list)
    bad_row_examples: list[str] = field(default_factory=list)  # "file:line: reason", first few
    sources: list[str] = field(default_factory=list)  # expanded input files, in order
    input_fingerprint: str = ""  # hash of inputs + settings: equal means a rerun is a no-op

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def save(self, out_dir: str) -> None:
        write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), self.to_json())

    @classmethod
    def load(cls, data_dir: str) -> "Manifest":
        path = os.path.join(data_dir, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise ShardError(f"{path} not found: the corpus is not prepared (or preparation did "
                             f"not finish); {PREPARE_HINT}")
        try:
            with open(path) as f:
                raw = json.load(f)
            if raw.pop("format", None) != FORMAT_NAME or raw.pop("version", None) != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as e:
            raise ShardError(f"{path} is unreadable ({e}); delete it and {PREPARE_HINT}") from None


def _file_sha256(path: str, block_bytes: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            h.update(chunk)
    return h.hexdigest()


class TokenShards:
    """Random access to the token stream of a prepared directory (or a contiguous range of it).

    Positions are global token offsets into the concatenation of all shards, in manifest order.
    At open every shard is checked (exists, size == num_tokens * itemsize, index length);
    `verify=True` also re-hashes every file (reads the whole corpus once).
    """

    _MAX_OPEN = 64  # files + index memmaps kept open at once (LRU): bounded for any shard count

    def __init__(self, data_dir: str, expected_tokenizer_hash: str | None = None, *,
                 verify: bool = False):
        self.dir = os.path.abspath(data_dir)
        self.manifest = m = Manifest.load(self.dir)
        if expected_tokenizer_hash is not None and expected_tokenizer_hash != m.tokenizer_sha256:
            raise ShardError(
                f"{self.dir} was tokenized with tokenizer sha256 {m.tokenizer_sha256[:16]}... "
                f"({m.tokenizer_name_or_path}) but the run uses {expected_tokenizer_hash[:16]}...; "
                f"prepare the corpus again with the run's tokenizer into a new directory")
        self.dtype = np.dtype(m.dtype)
        self.eos_id = m.eos_id
        self._shards = [s for s in m.shards if s.num_tokens > 0]
        for s in self._shards:
            self._check_shard(s, verify)
        counts = np.array([s.num_tokens for s in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._start, self._stop = 0, int(self._offsets[-1])  # the view's range
        self._num_docs: int | None = m.total_docs
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    # --- validation ---
    def _check_shard(self, s: ShardInfo, verify: bool) -> None:
        bin_path = os.path.join(self.dir, s.name + ".bin")
        idx_path = os.path.join(self.dir, s.name + ".idx.npy")
        for p in (bin_path, idx_path):
            if not os.path.isfile(p):
                raise ShardError(f"shard file {p} is missing; {PREPARE_HINT}")
        expected = s.num_tokens * self.dtype.itemsize
        size = os.path.getsize(bin_path)
        if size != expected:
            raise ShardError(f"shard {bin_path} has {size} bytes but the manifest says "
                             f"{s.num_tokens} tokens x {self.dtype.itemsize} B = {expected} B "
                             f"(truncated or overwritten); delete it and its .json, then {PREPARE_HINT}")
        n_idx = np.load(idx_path, mmap_mode="r").shape[0]
        if n_idx != s.num_docs:
            raise ShardError(f"shard index {idx_path} lists {n_idx} documents, the manifest "
                             f"{s.num_docs}; delete the shard's files, then {PREPARE_HINT}")
        if verify:
            for p, want in ((bin_path, s.sha256), (idx_path, s.idx_sha256)):
                if _file_sha256(p) != want:
                    raise ShardError(f"shard file {p} fails its sha256 check (corrupted); delete "
                                     f"the shard's files, then {PREPARE_HINT}")

    # --- views ---
    @property
    def num_tokens(self) -> int:
        return self._stop - self._start

    @property
    def num_docs(self) -> int:
        """Documents that start inside this view."""
        if self._num_docs is None:  # a slice: count per shard, never materialize the starts
            self._num_docs = 0
            for i, lo, hi, _ in self._spans(0, self.num_tokens):
                a, b = np.searchsorted(self._handle(i, ".idx.npy"), [lo, hi])
                self._num_docs += int(b - a)
        return self._num_docs

    @property
    def fingerprint(self) -> str:
        """Identity of the data this view reads: shard hashes plus the view's range."""
        h = hashlib.sha256(self.manifest.tokenizer_sha256.encode())
        for s in self._shards:
            h.update(s.sha256.encode())
        h.update(f"{self._start}:{self._stop}".encode())
        return h.hexdigest()

    def slice(self, start: int, stop: int) -> "TokenShards":
        """A view of tokens [start, stop) of this view, sharing files (no copy)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"slice [{start}, {stop}) outside 0..{self.num_tokens}")
        view = object.__new__(TokenShards)
        view.__dict__.update(self.__dict__)
        view._start, view._stop = self._start + start, self._start + stop
        view._num_docs = None
        view._open = OrderedDict()
        return view

    def split_holdout(self, *, eval_tokens: int | None = None,
                      eval_shards: int | None = None) -> tuple["TokenShards", "TokenShards"]:
        """(train, eval): the last `eval_tokens` tokens, or the last `eval_shards` shards, held out."""
        if (eval_tokens is None) == (eval_shards is None):
            raise ValueError("split_holdout: pass exactly one of eval_tokens= or eval_shards=")
        if eval_shards is not None:
            if (self._start, self._stop) != (0, int(self._offsets[-1])):
                raise ValueError("split_holdout(eval_shards=) needs the whole corpus, not a slice")
            if not 0 < eval_shards < len(self._shards):
                raise ValueError(f"eval_shards={eval_shards} must be in 1..{len(self._shards) - 1}")
            cut = int(self._offsets[-1 - eval_shards]) - self._start
        else:
            if not 0 < eval_tokens < self.num_tokens:
                raise ValueError(f"eval_tokens={eval_tokens} must be in 1..{self.num_tokens - 1}")
            cut = self.num_tokens - eval_tokens
        return self.slice(0, cut), self.slice(cut, self.num_tokens)

    # --- reading ---
    def _handle(self, i: int, kind: str):
        """Open file (".bin") or index memmap (".idx.npy") of shard i, from a small LRU."""
        key = (i, kind)
        h = self._open.get(key)
        if h is None:
            path = os.path.join(self.dir, self._shards[i].name + kind)
            h = open(path, "rb", buffering=0) if kind == ".bin" else np.load(path, mmap_mode="r")
            self._open[key] = h
            if len(self._open) > self._MAX_OPEN:
                self._open.popitem(last=False)  # a file closes when its last reference goes
        else:
            self._open.move_to_end(key)
        return h

    def _spans(self, start: int, length: int):
        """Yield (shard i, local lo, local hi, window offset) covering view positions [start, start+length)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.num_tokens}")
        pos, end = self._start + start, self._start + start + length
        i = int(np.searchsorted(self._offsets, pos, side="right")) - 1
        while pos < end:
            lo = pos - int(self._offsets[i])
            hi = min(end, int(self._offsets[i + 1])) - int(self._offsets[i])
            yield i, lo, hi, pos - self._start - start
            pos += hi - lo
            i += 1

    def tokens(self, global_start: int, length: int) -> np.ndarray:
        """Copy of tokens [global_start, global_start+length) in the shard dtype, across shards.

        Read with pread straight into the result, not through a memmap: with large page-cache
        folios (ext4/xfs on recent kernels) every memmap fault maps ~200 KiB into the process
        whatever madvise says, so RSS would grow towards the corpus size. pread keeps RSS at the
        rows actually held; the kernel's page cache still serves repeated reads.
        """
        out = np.empty(length, dtype=self.dtype)
        size = self.dtype.itemsize
        for i, lo, hi, at in self._spans(global_start, length):
            dest = out[at:at + hi - lo]
            got = os.preadv(self._handle(i, ".bin").fileno(), [dest], lo * size)
            if got != dest.nbytes:
                raise ShardError(f"shard {self._shards[i].name}.bin ended early (read {got} of "
                                 f"{dest.nbytes} B at token {lo}): it changed after open; "
                                 f"{PREPARE_HINT}")
        return out

    def doc_starts_in(self, global_start: int, length: int) -> np.ndarray:
        """int64 positions (relative to global_start) of document starts inside the window."""
        parts = []
        for i, lo, hi, at in self._spans(global_start, length):
            idx = self._handle(i, ".idx.npy")  # memmap: binary search touches a few pages
            a, b = np.searchsorted(idx, [lo, hi], side="left")
            parts.append(np.asarray(idx[a:b], dtype=np.int64) - lo + at)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __getstate__(self):
        # files do not pickle and memmaps pickle as full in-RAM copies (e.g. to DataLoader
        # workers): reopen lazily on the other side
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


# --- deterministic mixing and permutation ---
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded bijection of range(n) in O(1) memory: a balanced Feistel network over the smallest
    even-bit power of two >= n, cycle-walked back into range (at most ~4 steps on average).
    A numpy permutation of 1e8 row ids would cost 800 MB per source per epoch; this costs nothing."""

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"permutation size n={n} must be >= 1")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = (1 << self._half) - 1
        self._keys = [_mix64(key * self.ROUNDS + r) for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside range({self.n})")
        x = i
        while True:
            left, right = x >> self._half, x & self._mask
            for k in self._keys:
                left, right = right, left ^ (_mix64(right ^ k) & self._mask)
            x = (left << self._half) | right
            if x < self.n:
                return x


class PretrainRows:
    """Rows of `seq_len + 1` tokens cut from one or more token streams, mixed by weight.

    Row k of the global order is a pure function of (sources, weights, seq_len, seed, k), so the
    caller maps rows to ranks and micro-batches as it likes, and resuming needs only `next_row`.

    - Source i has R_i = (num_tokens_i - 1) // seq_len rows; row r covers tokens
      [r*seq_len, r*seq_len + seq_len + 1) (consecutive rows share one token: the last label).
    - Mixing: rows come in blocks of `mix_block_rows`; each block gives source i exactly its
      largest-remainder quota of the block (weights are honoured to 1/mix_block_rows), in a
      seeded per-block order. The j-th row drawn from source i is row perm_e(j mod R_i) of epoch
      e = j // R_i, with a fresh seeded Feistel permutation per (source, epoch).
    - packing=True: position_ids restart at 0 at every document start (and at the row start), and
      the label whose target is the first token of the next document is IGNORE_INDEX: the EOS is
      still predicted at the end of a document, the next document is not predicted from this one.
      packing=False: position_ids = arange and every label is kept (classic GPT-style streaming).
    """

    def __init__(self, sources, seq_len: int, seed: int, *, packing: bool = True,
                 mix_block_rows: int = 4096):
        if isinstance(sources, TokenShards):
            sources = [sources]
        pairs = [s if isinstance(s, tuple) else (s, 1.0) for s in sources]
        if not pairs:
            raise ValueError("PretrainRows needs at least one source")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.sources = [s for s, _ in pairs]
        weights = np.array([float(w) for _, w in pairs])
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"mixing weights {weights.tolist()} must all be finite and > 0")
        self.weights = (weights / weights.sum()).tolist()
        self.seq_len, self.seed, self.packing = int(seq_len), int(seed), bool(packing)
        self.source_rows = [(s.num_tokens - 1) // self.seq_len for s in self.sources]
        for s, n in zip(self.sources, self.source_rows):
            if n < 1:
                raise ValueError(f"source {s.dir} has {s.num_tokens} tokens, fewer than "
                                 f"seq_len+1={self.seq_len + 1}: lower data.max_seq_len or add data")
        self.block_rows = int(mix_block_rows)
        self._quota = self._apportion(self.block_rows)
        if len(self.sources) > 1 and (self._quota == 0).any():
            raise ValueError(f"a weight in {self.weights} is below 1/mix_block_rows="
                             f"1/{self.block_rows}; raise mix_block_rows or the weight")
        self._block_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: dict[tuple[int, int], FeistelPermutation] = {}
        self.next_row = 0  # global row index the iterator returns next

    def _apportion(self, total: int) -> np.ndarray:
        exact = np.array(self.weights) * total
        quota = np.floor(exact).astype(np.int64)
        order = np.argsort(-(exact - quota), kind="stable")  # ties go to the earlier source
        quota[order[: total - int(quota.sum())]] += 1
        return quota

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, rank of the position among its source's) for block b."""
        if self._block_cache is None or self._block_cache[0] != b:
            rng = np.random.default_rng([self.seed, 0x6D6978, b])
            src = rng.permutation(np.repeat(np.arange(len(self.sources)), self._quota))
            rank = np.empty_like(src)
            for i in range(len(self.sources)):
                pos = np.flatnonzero(src == i)
                rank[pos] = np.arange(pos.shape[0])
            self._block_cache = (b, src, rank)
        return self._block_cache[1], self._block_cache[2]

    def locate(self, k: int) -> tuple[int, int]:
        """(source index, row index within that source) of global row k."""
        if k < 0:
            raise IndexError(f"row {k} < 0")
        if len(self.sources) == 1:
            i, j = 0, k
        else:
            b, p = divmod(k, self.block_rows)
            src, rank = self._block(b)
            i = int(src[p])
            j = b * int(self._quota[i]) + int(rank[p])
        epoch, q = divmod(j, self.source_rows[i])
        perm = self._perm_cache.get((i, epoch))
        if perm is None:
            if len(self._perm_cache) > 16:
                self._perm_cache.clear()
            perm = FeistelPermutation(self.source_rows[i], _mix64(_mix64(self.seed) ^ (i << 32) ^ epoch))
            self._perm_cache[(i, epoch)] = perm
        return i, perm(q)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        i, r = self.locate(k)
        src, n = self.sources[i], self.seq_len
        toks = src.tokens(r * n, n + 1).astype(np.int64)
        input_ids, labels = toks[:-1], toks[1:].copy()
        if not self.packing:
            return {"input_ids": input_ids, "labels": labels, "position_ids": np.arange(n)}
        starts = src.doc_starts_in(r * n, n + 1)  # window positions 0..n
        labels[starts[starts > 0] - 1] = IGNORE_INDEX  # target would open the next document
        # position_ids: distance to the latest document start at or before t (row start counts)
        marks = np.zeros(n, dtype=np.int64)
        inner = starts[starts < n]
        marks[inner] = inner
        position_ids = np.arange(n) - np.maximum.accumulate(marks)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        row = self[self.next_row]
        self.next_row += 1
        return row

    # --- resume ---
    def _identity(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "packing": self.packing,
                "weights": self.weights, "mix_block_rows": self.block_rows,
                "sources": [s.fingerprint for s in self.sources]}

    def state_dict(self) -> dict:
        return {"version": 1, "next_row": self.next_row, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            raise ValueError(f"sampler state was saved with different {', '.join(diff)}: resuming "
                             f"would repeat or skip rows; restore the run's data settings or "
                             f"start fresh (train.resume=never)")
        self.next_row = int(state["next_row"])
