"""Tokenized SFT/DPO sequences: prepared once into chunk files on disk, read by position.

A *unit* is what the sampler shuffles and never splits: one sequence for SFT, a (chosen,
rejected) pair for DPO (`seqs_per_unit=2`). Every sample collection here answers the same
questions: `len` (units), `num_seqs`, `seq(j)` -> (ids, labels), `unit(i)`, `unit_lengths()`,
`seq_targets()`, `fingerprint()` and `subset(units)`.

  SampleSet    in memory (small sets, tests, previews)
  SampleStore  a prepared directory (llmtrain.data.prepare_samples): resident memory is ~16 bytes
               per sequence (lengths, trained-token counts, token offsets), never the tokens
  SampleView   some units of either, in a given order, without a copy (data.eval_fraction)

Layout of a prepared directory (each chunk = one row range of one source, see sources.Chunk):

    manifest.json         written last, atomically: chunk list, totals, fingerprint, bad-row counts
    <c>.ids               token ids of the chunk's sequences, concatenated (uint16 when the vocab
                          fits, else uint32), native little-endian
    <c>.mask              uint8, 1 where the token is a loss target (labels = ids there, else -100)
    <c>.seqs.npy          int32 (sequences, 2): length, trained tokens (first position excluded)
    <c>.values.npy        float32 (units,): a per-unit number read from a column (the reward
                          model's per-pair margin), only when the manifest says "unit_values"
    <c>.json              sidecar: counts, bad rows with file:line, sha256; written last, so its
                          presence marks the chunk finished
The fingerprint (a hash of the chunks' sha256s) is computed once, at preparation, and stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .labels import IGNORE_INDEX

FORMAT_NAME = "llmtrain.samples"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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
        if getattr(self, "_unit_lengths", None) is None:
            lengths = self.seq_lengths().astype(np.int64)
            self._unit_lengths = lengths.reshape(-1, self.seqs_per_unit).sum(axis=1)  # (seqs,) -> (units,)
        return self._unit_lengths

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

    def fingerprint(self) -> str:
        return self._fingerprint

    def unit_values(self) -> Optional[np.ndarray]:
        values = self.base.unit_values()
        return None if values is None else values[self.units]


# --------------------------------------------------------------------------- writing one chunk


def _tmp_suffix() -> str:
    # host and pid: ranks on several nodes may write the same chunk of a shared directory at once
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


def write_json_atomic(path: str, obj) -> None:
    tmp = path + _tmp_suffix()
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


class ChunkWriter:
    """Appends sequences to one chunk's files under temporary names; `finish` renames them into
    place and writes the sidecar last. Two processes writing the same chunk write the same bytes."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.dir, self.name, self.dtype = directory, name, np.dtype(dtype)
        self._limit = np.iinfo(self.dtype).max
        suffix = self._suffix = _tmp_suffix()
        self._tmp = {ext: os.path.join(directory, f".{name}{ext}{suffix}") for ext in (".ids", ".mask", ".seqs.npy")}
        self._ids = open(self._tmp[".ids"], "wb")
        self._mask = open(self._tmp[".mask"], "wb")
        self._sha = hashlib.sha256()  # of the files' bytes: their integrity
        self._content = 0  # of the sequences, foldable across chunks: the data's identity (see data_fingerprint)
        self._lengths: list[int] = []
        self._targets: list[int] = []
        self._values: list[float] = []  # one per unit, when the spec reads a value column

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        trained = labels != IGNORE_INDEX
        if not np.array_equal(labels[trained], ids[trained]):  # the storage keeps a mask, not labels
            raise ValueError("a row encoder returned labels that are neither the token id nor IGNORE_INDEX; "
                             "the prepared-sample format stores labels as a mask")
        if len(ids) and int(ids.max()) > self._limit:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}: the tokenizer's vocab is larger "
                             "than len(tokenizer)")
        for f, arr in ((self._ids, ids.astype(self.dtype)), (self._mask, trained.astype(np.uint8))):
            buf = arr.tobytes()
            f.write(buf)
            self._sha.update(buf)
        self._content = _fold(self._content, _seq_digest(ids, trained), 1)
        self._lengths.append(len(ids))
        self._targets.append(int(trained[1:].sum()))

    def add_unit_value(self, value: float) -> None:
        self._values.append(value)

    def finish(self, meta: dict) -> dict:
        """Close, rename into place, write the sidecar (last); return the sidecar."""
        self._ids.close()
        self._mask.close()
        if self._values:
            self._tmp[".values.npy"] = os.path.join(self.dir, f".{self.name}.values.npy{self._suffix}")
            values = np.asarray(self._values, dtype=np.float32)
            with open(self._tmp[".values.npy"], "wb") as f:
                np.save(f, values)
            self._sha.update(values.tobytes())
        seqs = np.array([self._lengths, self._targets], dtype=np.int32).T.reshape(-1, 2)  # (seqs, 2)
        with open(self._tmp[".seqs.npy"], "wb") as f:  # a file object: np.save(path) would append ".npy"
            np.save(f, seqs)
        self._sha.update(seqs.tobytes())
        for ext, tmp in self._tmp.items():
            os.replace(tmp, os.path.join(self.dir, self.name + ext))
        side = {"name": self.name, "num_seqs": len(self._lengths), "num_tokens": int(sum(self._lengths)),
                "num_values": len(self._values),
                "sha256": self._sha.hexdigest(), "content": self._content, **meta}
        write_json_atomic(os.path.join(self.dir, self.name + ".json"), side)
        return side

    def abort(self) -> None:
        for f in (self._ids, self._mask):
            f.close()
        for tmp in self._tmp.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def chunk_done(directory: str, name: str, dtype: np.dtype) -> Optional[dict]:
    """The sidecar of a finished chunk whose files have the sizes it states, else None."""
    try:
        with open(os.path.join(directory, name + ".json")) as f:
            side = json.load(f)
        n_tok = side["num_tokens"]
        ok = (os.path.getsize(os.path.join(directory, name + ".ids")) == n_tok * np.dtype(dtype).itemsize
              and os.path.getsize(os.path.join(directory, name + ".mask")) == n_tok
              and os.path.isfile(os.path.join(directory, name + ".seqs.npy"))
              and (not side.get("num_values") or os.path.isfile(os.path.join(directory, name + ".values.npy"))))
        return side if ok else None
    except (OSError, ValueError, KeyError):
        return None


# Content hash of a sequence list that chunks combine without re-reading any token: a polynomial
# hash H(s_1..s_n) = sum_j d(s_j) * B^(n-j) mod P over per-sequence sha256 digests d, so that
# H(A + B) = H(A) * B^len(B) + H(B). Equal for any chunking (and storage dtype) of the same sequences.
_P = (1 << 61) - 1
_B = 0x5DEECE66D2F1A3B


def _seq_digest(ids: np.ndarray, trained: np.ndarray) -> int:
    h = hashlib.sha256(ids.astype(np.int32).tobytes())
    h.update(trained.astype(np.uint8).tobytes())
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
    not a memmap: mapped page-cache folios would count towards the process's resident memory)."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        path = os.path.join(self.dir, MANIFEST_NAME)
        try:
            with open(path) as f:
                m = json.load(f)
            if m.get("format") != FORMAT_NAME or m.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
        except (OSError, ValueError) as e:
            raise SampleStoreError(f"{path} is missing or unreadable ({e}); delete {self.dir} to prepare again") from None
        self.manifest = m
        self.seqs_per_unit, self.dtype = int(m["seqs_per_unit"]), np.dtype(m["dtype"])
        self._chunks = [c["name"] for c in m["chunks"]]
        seq_counts = np.array([c["num_seqs"] for c in m["chunks"]], dtype=np.int64)
        tok_counts = np.array([c["num_tokens"] for c in m["chunks"]], dtype=np.int64)
        self._chunk_seq0 = np.concatenate([[0], np.cumsum(seq_counts)])  # (chunks + 1,)
        self._chunk_tok0 = np.concatenate([[0], np.cumsum(tok_counts)])
        seqs = [self._load_seqs(c) for c in m["chunks"]]
        seqs = np.concatenate(seqs) if seqs else np.zeros((0, 2), np.int32)  # (num_seqs, 2)
        self._lengths, self._targets = np.ascontiguousarray(seqs[:, 0]), np.ascontiguousarray(seqs[:, 1])
        self._starts = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])  # (num_seqs + 1,)
        self._open: OrderedDict = OrderedDict()
        self._max_open = _max_open_files()
        # the prefetch thread reads train batches while the main thread evaluates, and an
        # eval_fraction view reads this same store: the LRU must not close an fd another thread uses
        self._lock = threading.Lock()
        self._unit_lengths = None
        self._values = self._load_values(m) if m.get("unit_values") else None

    def _load_values(self, m: dict) -> np.ndarray:
        parts = []
        for c in m["chunks"]:
            path = os.path.join(self.dir, c["name"] + ".values.npy")
            units = c["num_seqs"] // self.seqs_per_unit
            values = np.load(path, allow_pickle=False) if units else np.zeros(0, np.float32)
            if values.shape != (units,):
                raise SampleStoreError(f"{path} holds {values.shape} values for {units} units; delete {self.dir} "
                                       "to prepare again")
            parts.append(values)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unit_values(self) -> Optional[np.ndarray]:
        return self._values

    def _load_seqs(self, c: dict) -> np.ndarray:
        base = os.path.join(self.dir, c["name"])
        for ext, size in ((".ids", c["num_tokens"] * self.dtype.itemsize), (".mask", c["num_tokens"])):
            if not os.path.isfile(base + ext) or os.path.getsize(base + ext) != size:
                raise SampleStoreError(f"{base}{ext} is missing or has the wrong size (the manifest says "
                                       f"{size} bytes); delete {self.dir} to prepare again")
        seqs = np.load(base + ".seqs.npy", allow_pickle=False)
        if seqs.shape != (c["num_seqs"], 2):
            raise SampleStoreError(f"{base}.seqs.npy holds {seqs.shape[0]} sequences, the manifest "
                                   f"{c['num_seqs']}; delete {self.dir} to prepare again")
        return seqs

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

    def _fd(self, c: int, ext: str) -> int:
        key = (c, ext)
        fd = self._open.get(key)
        if fd is None:
            fd = os.open(os.path.join(self.dir, self._chunks[c] + ext), os.O_RDONLY)
            self._open[key] = fd
            while len(self._open) > self._max_open:
                os.close(self._open.popitem(last=False)[1])
        else:
            self._open.move_to_end(key)
        return fd

    def _pread(self, c: int, ext: str, dtype: np.dtype, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=dtype)
        got = os.preadv(self._fd(c, ext), [out], start * dtype.itemsize)
        if got != out.nbytes:
            raise SampleStoreError(f"{self.dir}/{self._chunks[c]}{ext} ended early (read {got} of {out.nbytes} B): "
                                   f"it changed after it was prepared; delete {self.dir} to prepare again")
        return out

    def seq(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= j < self.num_seqs:
            raise IndexError(f"sequence {j} outside 0..{self.num_seqs - 1}")
        c = int(np.searchsorted(self._chunk_seq0, j, side="right")) - 1
        start, n = int(self._starts[j] - self._chunk_tok0[c]), int(self._lengths[j])
        with self._lock:
            ids = self._pread(c, ".ids", self.dtype, start, n).astype(np.int32)
            mask = self._pread(c, ".mask", np.dtype(np.uint8), start, n).view(bool)
        return ids, np.where(mask, ids, np.int32(IGNORE_INDEX))

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
    """File descriptors kept open (LRU): a quarter of the soft limit, at most 1024."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(8, min(1024, soft // 4 if soft > 0 else 256))


def cache_key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
