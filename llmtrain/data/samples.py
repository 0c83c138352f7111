"""Tokenized sequences in flat arrays, built once (rank 0) and cached on disk for the other ranks.

A `SampleSet` is every tokenized sequence of a split: `ids`/`labels` concatenated, `offsets`
marking where each sequence starts. A *unit* is what the sampler shuffles and never splits:
one sequence for SFT, a (chosen, rejected) pair for DPO (`seqs_per_unit=2`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .. import dist
from .chat import IGNORE_INDEX


@dataclass
class SampleSet:
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

    def __len__(self) -> int:  # units
        return self.num_seqs // self.seqs_per_unit

    def seq(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[j], self.offsets[j + 1]
        return self.ids[a:b], self.labels[a:b]

    def unit(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        k = self.seqs_per_unit
        return [self.seq(i * k + j) for j in range(k)]

    def unit_lengths(self) -> np.ndarray:
        lengths = np.diff(self.offsets)
        return lengths.reshape(-1, self.seqs_per_unit).sum(axis=1)  # (num_seqs,) -> (units,)

    def seq_targets(self) -> np.ndarray:
        """Trained tokens per sequence: labels != IGNORE, the first position excluded (nothing predicts it)."""
        trained = (self.labels != IGNORE_INDEX).astype(np.int64)
        trained[self.offsets[:-1][np.diff(self.offsets) > 0]] = 0
        return np.add.reduceat(trained, self.offsets[:-1]) if len(trained) else np.zeros(self.num_seqs, np.int64)

    def fingerprint(self) -> str:
        """Content hash: a resumed run checks it trains on exactly the same tokens."""
        h = hashlib.sha256()
        for a in (self.ids, self.labels, self.offsets):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str) -> None:
        tmp = path + ".tmp.npz"
        np.savez(tmp, ids=self.ids, labels=self.labels, offsets=self.offsets, seqs_per_unit=self.seqs_per_unit)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "SampleSet":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["ids"], z["labels"], z["offsets"], int(z["seqs_per_unit"]))


def build_cached(cache_path: str, build: Callable[[], SampleSet]) -> SampleSet:
    """Rank 0 builds (tokenizes) and writes the cache; the other ranks wait and read it.

    Tokenizing on every rank would cost N times the CPU and N times the bad-row reports.
    Any failure on rank 0 is broadcast so the others exit with it instead of hanging.
    """
    error = None
    if dist.is_main():
        try:
            if not os.path.exists(cache_path):
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                build().save(cache_path)
        except Exception as e:  # re-raised below, on every rank
            error = e
    message = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise SystemExit(1)  # rank 0 prints the reason
    return SampleSet.load(cache_path)


def cache_key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
