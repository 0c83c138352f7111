"""Tokenized SFT/DPO sequences: prepared once into chunk files on disk, read by position.

A *unit* is what the sampler shuffles and never splits: one sequence for SFT, a (chosen,
rejected) pair for DPO (`seqs_per_unit=2`). Every sample collection here answers the same
questions: `len` (units), `num_seqs`, `seq(j)` -> (ids, labels), `unit(i)`, `unit_lengths()`,
`seq_targets()`, `fingerprint()` and `subset(units)`.

  SampleSet    in memory (small sets, tests, previews)
  SampleStore  a prepared directory (llmtrain.data.prepare_samples), read by position with pread:
               resident memory is 16 bytes per sequence (int32 length, int32 trained-token count,
               int64 token offset), never the tokens; opening it reads two files, whatever the
               number of chunks
  SampleView   some units of either, in a given order, without a copy (data.eval_fraction)

Layout of a prepared directory (each chunk = one row range of one source, see sources.Chunk):

    manifest.json         written last, once: chunk list, totals, fingerprint, bad-row counts
    index.npy             int32 (sequences, 2) of the whole split: length, trained tokens (first
                          position excluded); what a store loads
    bad_rows.jsonl        every skipped row with its file:line and reason, in file order (if any)
    plan.json             the chunks (row ranges of the sources), fixed by the first planner
    <c>.bin               one chunk: its token ids (uint16 when the vocab fits, else uint32, native
                          little-endian), then its loss mask (uint8, 1 where the token is a target:
                          labels = ids there, else -100), then int32 (sequences, 2) as in index.npy,
                          then (only when the manifest says "payloads") each sequence's payload: UTF-8
                          JSON bytes (an RL prompt's conversation, extra columns and file:line)
    <c>.json              sidecar: counts, bad rows with file:line, sha256; its presence marks the
                          chunk finished
    <c>.claim             while a process tokenizes the chunk (llmtrain.data.claims)
    staged-*.parquet      Parquet sources rewritten with chunk-sized row groups (sources.stage_parquet)
    values.npy            float32 (units,): a per-unit number read from a column (the reward model's
                          per-pair margin), only when the manifest says "unit_values"; each chunk's
                          values sit in its sidecar until the split is consolidated
    payloads.npy          int32 (sequences,): each payload's length in bytes (when "payloads"), from
                          the sidecars' "payload_lengths"; a store keeps it and its offsets (12 B/seq)
Finished files are published first-wins and never replaced (llmtrain.data.files), so jobs sharing
a cache directory never swap a file under a reader. The fingerprint (a hash of the sequences'
content, independent of the chunking) is computed once, at preparation, and stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .labels import IGNORE_INDEX
from .files import publish_json_once, publish_once, read_json, tmp_suffix, write_json_atomic  # noqa: F401 (write_json_atomic: API)

FORMAT_NAME = "llmtrain.samples"
FORMAT_VERSION = 2  # 2: one .bin per chunk, consolidated index.npy and bad_rows.jsonl
MANIFEST_NAME, INDEX_NAME, BAD_ROWS_NAME = "manifest.json", "index.npy", "bad_rows.jsonl"
VALUES_NAME, PAYLOADS_NAME = "values.npy", "payloads.npy"


class SampleStoreError(RuntimeError):
    """A prepared sample directory is damaged or incomplete."""


# --------------------------------------------------------------------------- the common interface


class _Samples:
    seqs_per_unit: int

    def __len__(self) -> int:  # units
        return self.num_seqs // self.seqs_per_unit

    def unit(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        k = self.seqs_per_unit
        return [self.seq(i * k + j) for j in range(k)]

    def unit_lengths(self) -> np.ndarray:
        if self.seqs_per_unit == 1:
            return self.seq_lengths()  # no copy: 4-8 bytes per unit saved
        if getattr(self, "_unit_lengths", None) is None:
            lengths = self.seq_lengths().astype(np.int64)
            self._unit_lengths = lengths.reshape(-1, self.seqs_per_unit).sum(axis=1)  # (seqs,) -> (units,)
        return self._unit_lengths

    def read_seqs(self, seq_ids) -> dict:
        """{j: seq(j)} for many sequences at once, read in ascending order (one step's reads sorted:
        sequential within each chunk file instead of random)."""
        return {j: self.seq(j) for j in sorted(set(int(j) for j in seq_ids))}

    def subset(self, units: np.ndarray, tag: str) -> "SampleView":
        return SampleView(self, units, tag)

    def unit_values(self) -> Optional[np.ndarray]:
        """(units,) float32 per-unit values (EncodeSpec.value_column), or None when the data has none."""
        return None


@dataclass
class SampleSet(_Samples):
    ids: np.ndarray  # (total_tokens,) int32
    labels: np.ndarray  # (total_tokens,) int32, IGNORE_INDEX where nothing is learned
    offsets: np.ndarray  # (num_seqs + 1,) int64
    seqs_per_unit: int = 1  # 1: SFT sequence; 2: DPO chosen+rejected pair

    @classmethod
    def from_sequences(cls, seqs: Iterable[tuple[np.ndarray, np.ndarray]], seqs_per_unit: int = 1) -> "SampleSet":
        ids, labels, lengths = [], [], [0]
        for i, l in seqs:
            ids.append(i)
            labels.append(l)
            lengths.append(len(i))
        cat = (lambda xs: np.concatenate(xs).astype(np.int32)) if ids else (lambda xs: np.zeros(0, np.int32))
        return cls(cat(ids), cat(labels), np.cumsum(lengths, dtype=np.int64), seqs_per_unit)

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1

    def seq(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[j], self.offsets[j + 1]
        return self.ids[a:b], self.labels[a:b]

    def seq_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def seq_targets(self) -> np.ndarray:
        """Trained tokens per sequence: labels != IGNORE, the first position excluded (nothing predicts it)."""
        trained = (self.labels != IGNORE_INDEX).astype(np.int64)
        trained[self.offsets[:-1][np.diff(self.offsets) > 0]] = 0
        return np.add.reduceat(trained, self.offsets[:-1]) if len(trained) else np.zeros(self.num_seqs, np.int64)

    def fingerprint(self) -> str:
        """Content hash: a resumed run checks it trains on exactly the same tokens (O(tokens): small sets only)."""
        h = hashlib.sha256()
        for a in (self.ids, self.labels, self.offsets):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


class SampleView(_Samples):
    """Units `units` of `base`, in that order (e.g. the train or eval part of data.eval_fraction)."""

    def __init__(self, base, units: np.ndarray, tag: str):
        self.base, self.units = base, np.asarray(units, dtype=np.int64)
        self.seqs_per_unit = base.seqs_per_unit
        self._fingerprint = hashlib.sha256(f"{base.fingerprint()}|{tag}".encode()).hexdigest()[:16]
        self._unit_lengths = None

    @property
    def num_seqs(self) -> int:
        return len(self.units) * self.seqs_per_unit

    def _base_seqs(self) -> np.ndarray:
        k = self.seqs_per_unit
        return (self.units[:, None] * k + np.arange(k)).reshape(-1)  # (units, k) -> (seqs,)

    def seq(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.seqs_per_unit
        return self.base.seq(int(self.units[j // k]) * k + j % k)

    def seq_lengths(self) -> np.ndarray:
        return self.base.seq_lengths()[self._base_seqs()]

    def seq_targets(self) -> np.ndarray:
        return self.base.seq_targets()[self._base_seqs()]

    def read_seqs(self, seq_ids) -> dict:
        k = self.seqs_per_unit
        base_of = {int(j): int(self.units[int(j) // k]) * k + int(j) % k for j in seq_ids}
        got = self.base.read_seqs(base_of.values())
        return {j: got[b] for j, b in base_of.items()}

    def fingerprint(self) -> str:
        return self._fingerprint

    def unit_values(self) -> Optional[np.ndarray]:
        values = self.base.unit_values()
        return None if values is None else values[self.units]


# --------------------------------------------------------------------------- writing one chunk


class ChunkWriter:
    """Appends sequences to one chunk's files under temporary names; `finish` publishes the .bin,
    then the sidecar, each first-wins: a chunk another process finished first is never replaced
    (both wrote the same bytes), so readers of a shared cache never see a file swapped."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.dir, self.name, self.dtype = directory, name, np.dtype(dtype)
        self._limit = np.iinfo(self.dtype).max
        suffix = tmp_suffix()
        self._tmp_bin = os.path.join(directory, f".{name}.bin{suffix}")
        self._tmp_mask = os.path.join(directory, f".{name}.mask{suffix}")
        self._ids = open(self._tmp_bin, "wb")
        self._mask = open(self._tmp_mask, "wb")
        self._sha = hashlib.sha256()  # of the file's bytes: its integrity
        self._mask_sha = hashlib.sha256()
        self._content = 0  # of the sequences, foldable across chunks: the data's identity (see data_fingerprint)
        self._lengths: list[int] = []
        self._values: list[float] = []  # one per unit, when the spec reads a value column
        self._targets: list[int] = []
        self._tmp_payload = os.path.join(directory, f".{name}.payload{suffix}")
        self._payload = None  # opened by the first payload
        self._payload_lengths: list[int] = []

    def add(self, ids: np.ndarray, labels: np.ndarray, payload: Optional[bytes] = None,
            identity: Optional[bytes] = None) -> None:
        """One sequence; payload: bytes stored beside it (all of a chunk's sequences have one, or none);
        identity: what of the payload is the data's content (default: all of it), for the fingerprint."""
        trained = labels != IGNORE_INDEX
        if not np.array_equal(labels[trained], ids[trained]):  # the storage keeps a mask, not labels
            raise ValueError("a row encoder returned labels that are neither the token id nor IGNORE_INDEX; "
                             "the prepared-sample format stores labels as a mask")
        if len(ids) and int(ids.max()) > self._limit:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}: the tokenizer's vocab is larger "
                             "than len(tokenizer)")
        ids_buf, mask_buf = ids.astype(self.dtype).tobytes(), trained.astype(np.uint8).tobytes()
        self._ids.write(ids_buf)
        self._sha.update(ids_buf)
        self._mask.write(mask_buf)
        self._mask_sha.update(mask_buf)
        if (payload is None) != (self._payload is None) and self._lengths:
            raise ValueError("either every sequence of a chunk has a payload or none has")
        if payload is not None:
            if self._payload is None:
                self._payload = open(self._tmp_payload, "wb")
            self._payload.write(payload)
            self._payload_lengths.append(len(payload))
        self._content = _fold(self._content, _seq_digest(ids, trained, payload if identity is None else identity), 1)
        self._lengths.append(len(ids))
        self._targets.append(int(trained[1:].sum()))

    def add_unit_value(self, value: float) -> None:
        self._values.append(value)

    def finish(self, meta: dict) -> dict:
        """Close, publish the .bin (ids, mask, per-sequence table) and then the sidecar; return the
        sidecar in place (ours, or that of a process that finished this chunk first)."""
        side_path = os.path.join(self.dir, self.name + ".json")
        existing = read_sidecar(side_path)
        if existing is not None:  # finished meanwhile by another process (another job, a stale claim)
            self.abort()
            return existing
        self._mask.close()
        seqs = np.array([self._lengths, self._targets], dtype=np.int32).T.reshape(-1, 2)  # (seqs, 2)
        with open(self._tmp_mask, "rb") as f:  # ids | mask | seqs in one file: one descriptor per chunk
            while block := f.read(1 << 20):
                self._ids.write(block)
        self._ids.write(seqs.tobytes())
        self._sha.update(self._mask_sha.digest())
        self._sha.update(seqs.tobytes())
        if self._payload is not None:  # ids | mask | seqs | payloads
            self._payload.close()
            with open(self._tmp_payload, "rb") as f:
                while block := f.read(1 << 20):
                    self._ids.write(block)
                    self._sha.update(block)
            os.remove(self._tmp_payload)
            meta = {**meta, "payload_lengths": self._payload_lengths}
        self._ids.close()
        os.remove(self._tmp_mask)
        if self._values:  # a few bytes per unit: in the sidecar, consolidated into values.npy at the end
            self._sha.update(np.asarray(self._values, dtype=np.float32).tobytes())
            meta = {**meta, "unit_values": [float(v) for v in self._values]}
        publish_once(self._tmp_bin, os.path.join(self.dir, self.name + ".bin"))
        side = {"name": self.name, "num_seqs": len(self._lengths), "num_tokens": int(sum(self._lengths)),
                "sha256": self._sha.hexdigest(), "content": self._content, **meta}
        if publish_json_once(side_path, side):
            return side
        return read_sidecar(side_path) or side

    def abort(self) -> None:
        for f in (self._ids, self._mask, self._payload):
            if f is not None:
                f.close()
        for tmp in (self._tmp_bin, self._tmp_mask, self._tmp_payload):
            if os.path.exists(tmp):
                os.remove(tmp)


def read_sidecar(path: str) -> Optional[dict]:
    """A chunk's sidecar (or a manifest), or None when it is missing or half-written."""
    return read_json(path)


def chunk_done(directory: str, name: str, dtype: np.dtype) -> Optional[dict]:
    """The sidecar of a finished chunk whose .bin has the size it states, else None."""
    side = read_sidecar(os.path.join(directory, name + ".json"))
    if side is None:
        return None
    try:
        size = os.path.getsize(os.path.join(directory, name + ".bin"))
    except OSError:
        return None
    expected = _bin_size(side["num_tokens"], side["num_seqs"], np.dtype(dtype)) + sum(side.get("payload_lengths", ()))
    return side if size == expected else None


def _bin_size(num_tokens: int, num_seqs: int, dtype: np.dtype) -> int:
    return num_tokens * (dtype.itemsize + 1) + num_seqs * 8  # without payloads


# --------------------------------------------------------------------------- one split from its chunks


def finalize_split(directory: str, sides: list[dict], seqs_per_unit: int, dtype, extra: Optional[dict] = None,
                   unit_values: bool = False, payloads: bool = False) -> dict:
    """Consolidate finished chunks into index.npy, bad_rows.jsonl, values.npy (unit_values: the
    sidecars' per-unit values), payloads.npy (payloads: their payload lengths) and (last)
    manifest.json, each published first-wins; returns the
    manifest in place. O(chunks) reads, once, in one process, so that every rank's later open reads
    two or three files."""
    dtype = np.dtype(dtype)
    n_seqs = sum(s["num_seqs"] for s in sides)
    index_tmp = os.path.join(directory, INDEX_NAME + tmp_suffix())
    index = np.lib.format.open_memmap(index_tmp, mode="w+", dtype=np.int32, shape=(n_seqs, 2))
    at = 0
    for s in sides:
        n, n_tok = s["num_seqs"], s["num_tokens"]
        if n:
            with open(os.path.join(directory, s["name"] + ".bin"), "rb") as f:
                f.seek(n_tok * (dtype.itemsize + 1))
                index[at:at + n] = np.frombuffer(f.read(n * 8), dtype=np.int32).reshape(n, 2)
        at += n
    index.flush()
    del index
    publish_once(index_tmp, os.path.join(directory, INDEX_NAME))
    fingerprint = data_fingerprint(seqs_per_unit, sides)
    if unit_values:
        values = np.asarray([v for s in sides for v in s.get("unit_values", [])], dtype=np.float32)  # (units,)
        # the values are part of the data: the same pairs with other margins must not resume as the same run
        fingerprint = hashlib.sha256(f"{fingerprint}|values|{hashlib.sha256(values.tobytes()).hexdigest()}"
                                     .encode()).hexdigest()[:16]
        _save_npy_once(directory, VALUES_NAME, values)
    if payloads:
        lengths = np.asarray([n for s in sides for n in s.get("payload_lengths", [])], dtype=np.int32)
        if len(lengths) != n_seqs:
            raise SampleStoreError(f"{directory}: {len(lengths)} payloads for {n_seqs} sequences")
        _save_npy_once(directory, PAYLOADS_NAME, lengths)
        extra = {**(extra or {}), "payload_columns": sorted({c for s in sides for c in s.get("payload_columns", [])})}
    bad = [b for s in sides for b in s.get("bad", [])]
    if bad:
        bad_tmp = os.path.join(directory, BAD_ROWS_NAME + tmp_suffix())
        with open(bad_tmp, "w") as f:
            for origin, reason in bad:
                f.write(json.dumps({"origin": origin, "reason": reason}) + "\n")
        publish_once(bad_tmp, os.path.join(directory, BAD_ROWS_NAME))
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "seqs_per_unit": seqs_per_unit, "dtype": dtype.name,
        "chunks": [{k: s[k] for k in ("name", "num_seqs", "num_tokens", "sha256")} for s in sides],
        "num_seqs": n_seqs, "num_tokens": sum(s["num_tokens"] for s in sides),
        "rows": sum(s.get("rows", 0) for s in sides), "bad_rows": len(bad),
        "dropped_too_long": sum(s.get("dropped_too_long", 0) for s in sides),
        "fingerprint": fingerprint, "unit_values": unit_values, "payloads": payloads, **(extra or {}),
    }
    path = os.path.join(directory, MANIFEST_NAME)
    if not publish_json_once(path, manifest):
        manifest = read_sidecar(path) or manifest
    return manifest


def _save_npy_once(directory: str, name: str, array: np.ndarray) -> None:
    tmp = os.path.join(directory, name + tmp_suffix())
    with open(tmp, "wb") as f:  # a file object: np.save(path) would append ".npy"
        np.save(f, array)
    publish_once(tmp, os.path.join(directory, name))


def read_bad_rows(directory: str) -> list[tuple[str, str]]:
    """A prepared split's skipped rows [(origin, reason)], in file order (one file)."""
    path = os.path.join(directory, BAD_ROWS_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["origin"], r["reason"]) for r in map(json.loads, f)]


# Content hash of a sequence list that chunks combine without re-reading any token: a polynomial
# hash H(s_1..s_n) = sum_j d(s_j) * B^(n-j) mod P over per-sequence sha256 digests d, so that
# H(A + B) = H(A) * B^len(B) + H(B). Equal for any chunking (and storage dtype) of the same sequences.
_P = (1 << 61) - 1
_B = 0x5DEECE66D2F1A3B


def _seq_digest(ids: np.ndarray, trained: np.ndarray, payload: Optional[bytes] = None) -> int:
    h = hashlib.sha256(ids.astype(np.int32).tobytes())
    h.update(trained.astype(np.uint8).tobytes())
    if payload is not None:  # e.g. an RL prompt's gold answer: the same prompts with other answers differ
        h.update(b"payload")
        h.update(payload)
    return int.from_bytes(h.digest()[:8], "little") % _P


def _fold(acc: int, value: int, n: int) -> int:
    """Append `value`, the hash of n sequences, to `acc`."""
    return (acc * pow(_B, n, _P) + value) % _P


def data_fingerprint(seqs_per_unit: int, chunks: list[dict]) -> str:
    """The identity of the prepared samples, computed once from the chunks' sidecars and stored."""
    acc = 0
    for c in chunks:
        acc = _fold(acc, c["content"], c["num_seqs"])
    n = sum(c["num_seqs"] for c in chunks)
    return hashlib.sha256(f"{FORMAT_NAME}|{seqs_per_unit}|{n}|{acc}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- reading a prepared directory


class SampleStore(_Samples):
    """The sequences of a prepared directory, read by position with pread (see TokenShards.tokens for why
    not a memmap: mapped page-cache folios would count towards the process's resident memory).

    Opening reads manifest.json and index.npy only (no per-chunk file is touched: on Lustre/NFS,
    64 ranks x 10^5 chunks x a few stats each would be millions of metadata operations per start);
    a damaged chunk file shows when it is read, as a SampleStoreError naming it."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        path = os.path.join(self.dir, MANIFEST_NAME)
        try:
            with open(path) as f:
                m = json.load(f)
            if m.get("format") != FORMAT_NAME or m.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
            index = np.load(os.path.join(self.dir, INDEX_NAME), allow_pickle=False)  # (num_seqs, 2) int32
        except (OSError, ValueError) as e:
            raise SampleStoreError(f"{path} or its {INDEX_NAME} is missing or unreadable ({e}); delete {self.dir} "
                                   "to prepare again") from None
        if index.shape != (m["num_seqs"], 2):
            raise SampleStoreError(f"{self.dir}/{INDEX_NAME} holds {index.shape[0]} sequences, the manifest "
                                   f"{m['num_seqs']}; delete {self.dir} to prepare again")
        self.manifest = m
        self.seqs_per_unit, self.dtype = int(m["seqs_per_unit"]), np.dtype(m["dtype"])
        self._chunks = [c["name"] for c in m["chunks"]]
        seq_counts = np.array([c["num_seqs"] for c in m["chunks"]], dtype=np.int64)
        tok_counts = np.array([c["num_tokens"] for c in m["chunks"]], dtype=np.int64)
        self._chunk_seq0 = np.concatenate([[0], np.cumsum(seq_counts)])  # (chunks + 1,)
        self._chunk_tok0 = np.concatenate([[0], np.cumsum(tok_counts)])
        self._chunk_tokens = tok_counts
        self._lengths, self._targets = np.ascontiguousarray(index[:, 0]), np.ascontiguousarray(index[:, 1])
        del index
        self._starts = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])  # (num_seqs + 1,)
        self._open: OrderedDict = OrderedDict()
        self._max_open = _max_open_files()
        # the prefetch thread reads train batches while the main thread evaluates, and an
        # eval_fraction view reads this same store: the LRU must not close an fd another thread uses
        self._lock = threading.Lock()
        self._unit_lengths = None
        self._values = self._load_array(VALUES_NAME, len(self)) if m.get("unit_values") else None
        self._payload_starts = None
        if m.get("payloads"):  # byte offset of sequence j's payload in its chunk's .bin
            lengths = self._load_array(PAYLOADS_NAME, self.num_seqs)
            self._payload_len = lengths
            starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            chunk_base = starts[self._chunk_seq0]  # (chunks + 1,) payload bytes before each chunk
            owner = np.repeat(np.arange(len(seq_counts)), seq_counts)
            fixed = tok_counts * (self.dtype.itemsize + 1) + seq_counts * 8  # ids | mask | seqs, per chunk
            self._payload_starts = starts[:-1] - chunk_base[owner] + fixed[owner]  # (num_seqs,) int64

    def _load_array(self, name: str, n: int) -> np.ndarray:
        path = os.path.join(self.dir, name)
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SampleStoreError(f"{path} is missing or unreadable ({e}); delete {self.dir} to prepare again") from None
        if values.shape != (n,):
            raise SampleStoreError(f"{path} holds {values.shape} values for {n}; delete {self.dir} to prepare again")
        return values

    def payload(self, j: int) -> bytes:
        """Sequence j's payload bytes (a store prepared with payloads); one pread."""
        if self._payload_starts is None:
            raise SampleStoreError(f"{self.dir} was prepared without payloads")
        if not 0 <= j < self.num_seqs:
            raise IndexError(f"sequence {j} outside 0..{self.num_seqs - 1}")
        c = int(np.searchsorted(self._chunk_seq0, j, side="right")) - 1
        with self._lock:
            return self._pread(c, np.dtype(np.uint8), int(self._payload_starts[j]), int(self._payload_len[j])).tobytes()

    def unit_values(self) -> Optional[np.ndarray]:
        return self._values

    @property
    def num_seqs(self) -> int:
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]  # computed once, at preparation

    def seq_lengths(self) -> np.ndarray:
        return self._lengths

    def seq_targets(self) -> np.ndarray:
        return self._targets

    def _fd(self, c: int) -> int:
        fd = self._open.get(c)
        if fd is None:
            try:
                fd = os.open(os.path.join(self.dir, self._chunks[c] + ".bin"), os.O_RDONLY)
            except OSError as e:
                raise SampleStoreError(f"{self.dir}/{self._chunks[c]}.bin cannot be opened ({e.strerror}); "
                                       f"delete {self.dir} to prepare again") from None
            self._open[c] = fd
            while len(self._open) > self._max_open:
                os.close(self._open.popitem(last=False)[1])
        else:
            self._open.move_to_end(c)
        return fd

    def _pread(self, c: int, dtype: np.dtype, byte_offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=dtype)
        got = os.preadv(self._fd(c), [out], byte_offset)
        if got != out.nbytes:
            raise SampleStoreError(f"{self.dir}/{self._chunks[c]}.bin ended early (read {got} of {out.nbytes} B): "
                                   f"it changed after it was prepared; delete {self.dir} to prepare again")
        return out

    def _read(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence j; the caller holds the lock. Two preads on the chunk's one descriptor."""
        if not 0 <= j < self.num_seqs:
            raise IndexError(f"sequence {j} outside 0..{self.num_seqs - 1}")
        c = int(np.searchsorted(self._chunk_seq0, j, side="right")) - 1
        start, n = int(self._starts[j] - self._chunk_tok0[c]), int(self._lengths[j])
        ids = self._pread(c, self.dtype, start * self.dtype.itemsize, n).astype(np.int32)
        mask_at = int(self._chunk_tokens[c]) * self.dtype.itemsize + start  # the mask follows the chunk's ids
        mask = self._pread(c, np.dtype(np.uint8), mask_at, n).view(bool)
        return ids, np.where(mask, ids, np.int32(IGNORE_INDEX))

    def seq(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._read(j)

    def read_seqs(self, seq_ids) -> dict:
        with self._lock:  # one acquisition per step, reads in file order
            return {j: self._read(j) for j in sorted(set(int(j) for j in seq_ids))}

    def close(self) -> None:
        with self._lock:
            while self._open:
                os.close(self._open.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file descriptors do not travel; reopened lazily
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _max_open_files() -> int:
    """File descriptors kept open (LRU, one per chunk): the soft limit is raised to the hard one
    first (commonly 1024 -> 2^19+), then a quarter of it, at most 16384."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if 0 < soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):  # not allowed here: keep the soft limit
                pass
    except ImportError:
        soft = 1024
    return max(8, min(16384, soft // 4 if soft > 0 else 256))


def cache_key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
