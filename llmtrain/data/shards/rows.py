"""Pretraining data for the loop: prepared token shards -> fixed-length rows, planned per step.

Rows. A row is `data.max_seq_len` consecutive tokens of one source's stream (documents joined
with EOS, see shards.py). `PretrainRows` is built with seq_len = max_seq_len - 1, so row r covers
tokens [r*(L-1), r*(L-1) + L) and consecutive rows share one token: every token of the stream
(but the very first) is a *target* in exactly one row, and nothing is wasted at row ends.
Rows are collated in the Hugging Face convention (labels = inputs; the loss shifts them), with
`data.packing: true` splitting a row at document starts so that position_ids restart and the
label that would predict a document's first token from the previous document is masked.

Order. Optimizer step s uses global rows [s*G, (s+1)*G), G = micro_batch_size * grad_accum *
world_size; rank r's micro-batch m takes the mbs rows from ((m * world) + r) * mbs (the
BatchPlanner convention: 2 ranks x accum 2 see the same step as 1 rank x accum 4). Row k of the
global order is a pure function of (shards, weights, seed, k) (PretrainRows), so the whole data
position is one integer and a resumed run continues exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional

import numpy as np

from ...config import DataConfig, SourceConfig, TrainConfig, sources
from ...errors import ConfigError, DataError
from ..batching import StepPlan, collate_sequences
from ..protocol import DataContext, EvalSet, data_coordinates
from ..tokenizer_id import vocab_hash
from .store import MANIFEST_NAME, PretrainRows, ShardError, TokenShards

Window = tuple[np.ndarray, np.ndarray]  # (tokens (n,) int64, document starts in it (k,) int64)


def _prepare_hint(key: str, i: int) -> str:
    return (f"give {key}[{i}] a prepare_from (raw files) and run `llmtrain prepare --recipe R` "
            f"(python launch/prepare.py --recipe R), or point path at a prepared shard directory")


def open_shards(src: SourceConfig, key: str, i: int, shard_tok_hash: Optional[str]) -> TokenShards:
    """A data.train / data.eval entry -> its TokenShards (format `shards`, or auto with a manifest)."""
    if src.format not in ("auto", "shards"):
        raise ConfigError(f"{key}[{i}]: format={src.format!r}, but pretraining reads prepared token shards "
                          f"(format: shards); {_prepare_hint(key, i)}")
    if not os.path.isfile(os.path.join(src.path, MANIFEST_NAME)):
        what = "does not exist" if not os.path.exists(src.path) else "is not a prepared shard directory (no manifest.json)"
        raise DataError(f"{key}[{i}]: {src.path} {what}; {_prepare_hint(key, i)}")
    try:
        return TokenShards(src.path, expected_tokenizer_hash=shard_tok_hash)
    except ShardError as e:
        raise DataError(f"{key}[{i}]: {e}") from None


def _read_window(shards: TokenShards, start: int, length: int, packing: bool) -> Window:
    tokens = shards.tokens(start, length).astype(np.int64)
    starts = shards.doc_starts_in(start, length) if packing else np.zeros(0, dtype=np.int64)
    return tokens, starts


def _targets_in(starts: np.ndarray, length: int) -> int:
    """Target tokens of a row of `length` tokens: all but the first, minus masked document starts."""
    return length - 1 - int(np.count_nonzero(starts > 0))


def collate_windows(windows: list[Window], pad_id: int) -> dict:
    """Rows of tokens -> padded tensors via `collate_sequences`: each row is split at its document
    starts (none without packing) so position_ids restart there and the first label of each piece
    is masked; a row's own first label is masked too (nothing precedes it; the shift drops it)."""
    rows = []
    for tokens, starts in windows:
        pieces = np.split(tokens, starts[starts > 0])  # (n,) -> documents (or their parts)
        rows.append([(p, p) for p in pieces])
    return collate_sequences(rows, pad_id)


class PretrainData:
    """The loop's data interface (`next_step`, `batches`, `eval_set`, `state_dict`) over token shards."""

    def __init__(self, d: DataConfig, t: TrainConfig, info, train: list[tuple[TokenShards, float]],
                 eval_sources: list[TokenShards], pad_id: int):
        self.info, self.pad_id, self.packing, self.eval_max_batches = info, pad_id, d.packing, t.eval_max_batches
        self.row_tokens = d.max_seq_len  # tokens per row fed to the model
        try:
            self.rows = PretrainRows(train, seq_len=self.row_tokens - 1, seed=t.seed, packing=d.packing)
        except ValueError as e:
            raise DataError(f"data.train: {e}") from None
        self.mbs, self.ga = t.micro_batch_size, t.grad_accum
        self.rank, self.world = data_coordinates(info)  # SP/TP peers read the same rows
        self.rows_per_step = self.mbs * self.ga * self.world
        self.rows_per_epoch = sum(self.rows.source_rows)  # for the logged (fractional) epoch
        self.eval_sources = eval_sources

    # --- training ---
    def _window(self, k: int) -> Window:
        i, r = self.rows.locate(k)
        n = self.rows.seq_len
        return _read_window(self.rows.sources[i], r * n, n + 1, self.packing)

    def _targets(self, k: int) -> int:
        if not self.packing:
            return self.rows.seq_len
        i, r = self.rows.locate(k)
        n = self.rows.seq_len
        # the document index is memmapped: a binary search, no token read
        return _targets_in(self.rows.sources[i].doc_starts_in(r * n, n + 1), n + 1)

    def next_step(self) -> StepPlan:
        first = self.rows.next_row
        mine = [[first + (m * self.world + self.rank) * self.mbs + j for j in range(self.mbs)] for m in range(self.ga)]
        # every rank counts the whole global batch's targets itself: no communication
        weight = sum(self._targets(k) for k in range(first, first + self.rows_per_step))
        self.rows.next_row = first + self.rows_per_step
        return StepPlan(micro_batches=mine, global_weight=weight, global_tokens=self.rows_per_step * self.row_tokens,
                        epoch=self.rows.next_row / self.rows_per_epoch)

    def batches(self, plan: StepPlan) -> list[dict]:
        return [collate_windows([self._window(k) for k in rows], self.pad_id) for rows in plan.micro_batches]

    # --- eval ---
    def eval_set(self) -> Optional[EvalSet]:
        if not self.eval_sources:
            return None
        rows = EvalRows(self.eval_sources, self.row_tokens, self.packing)
        per_rank = -(-len(rows) // self.world)  # every rank runs the same number of forwards
        num_batches = -(-per_rank // self.mbs)
        if self.eval_max_batches:
            num_batches = min(num_batches, self.eval_max_batches)
        used = min(len(rows), num_batches * self.mbs * self.world)  # global rows [0, used)
        weight = sum(rows.targets(q) for q in range(used))
        return EvalSet(EvalBatches(rows, used, num_batches, self.mbs, self.world, self.rank, self.pad_id), weight)

    # --- resume ---
    def _fingerprint(self) -> str:
        ident = {k: v for k, v in self.rows.state_dict().items() if k != "next_row"}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {**self.rows.state_dict(), "rows_per_step": self.rows_per_step, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.rows.load_state_dict(state)
        except ValueError as e:
            raise ConfigError(f"train.resume: {e}") from None


class EvalRows:
    """Every eval token once: each source cut into rows of <= row_tokens tokens with stride
    row_tokens - 1 (the last row may be shorter), sources one after another, in file order."""

    def __init__(self, shards: list[TokenShards], row_tokens: int, packing: bool):
        self.shards, self.n, self.packing = shards, row_tokens - 1, packing
        counts = [max(0, -(-(s.num_tokens - 1) // self.n)) for s in shards]  # rows with >= 2 tokens
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _span(self, q: int) -> tuple[TokenShards, int, int]:
        e = int(np.searchsorted(self.offsets, q, side="right")) - 1
        s = self.shards[e]
        start = (q - int(self.offsets[e])) * self.n
        return s, start, min(self.n + 1, s.num_tokens - start)

    def window(self, q: int) -> Window:
        return _read_window(*self._span(q), self.packing)

    def targets(self, q: int) -> int:
        s, start, length = self._span(q)
        if not self.packing:
            return length - 1
        return _targets_in(s.doc_starts_in(start, length), length)


class EvalBatches:
    """This rank's eval micro-batches, collated lazily (the eval set is never held in memory):
    rank r takes global rows r, r + world, ...; ranks past the end get empty (all-padding) batches."""

    def __init__(self, rows: EvalRows, used: int, num_batches: int, micro_batch_size: int, world: int, rank: int,
                 pad_id: int):
        self.rows, self.used, self.num_batches = rows, used, num_batches
        self.mbs, self.world, self.rank, self.pad_id = micro_batch_size, world, rank, pad_id

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        mine = range(self.rank, self.used, self.world)
        for b in range(self.num_batches):
            qs = mine[b * self.mbs: (b + 1) * self.mbs]
            yield collate_windows([self.rows.window(q) for q in qs], self.pad_id)


# --------------------------------------------------------------------------- building it


def _eval_split(train: list[tuple[TokenShards, float]], fraction: float, row_tokens: int):
    """data.eval_fraction: the tail of every train source is held out (never trained on)."""
    kept, held = [], []
    for i, (s, w) in enumerate(train):
        eval_tokens = max(2, int(s.num_tokens * fraction))
        if s.num_tokens - eval_tokens < row_tokens:
            raise DataError(f"data.train[{i}]: {s.dir} has {s.num_tokens} tokens, too few to hold out "
                            f"data.eval_fraction={fraction} and keep one row of {row_tokens}; "
                            f"lower data.eval_fraction or data.max_seq_len")
        a, b = s.split_holdout(eval_tokens=eval_tokens)
        kept.append((a, w))
        held.append(b)
    return kept, held


def pretrain_data(ctx: DataContext) -> PretrainData:
    """data.train / data.eval shard directories (or a data.eval_fraction tail of train) -> PretrainData."""
    # shards record the tokenizer's vocab_hash (no chat template touches a token stream), not the
    # run's tokenizer_hash
    shard_hash = vocab_hash(ctx.tokenizer)
    train = [(open_shards(s, "data.train", i, shard_hash), s.weight) for i, s in enumerate(sources(ctx.data, "data.train"))]
    evals = [open_shards(s, "data.eval", i, shard_hash) for i, s in enumerate(sources(ctx.data, "data.eval"))]
    if not evals and ctx.data.eval_fraction > 0:
        train, evals = _eval_split(train, ctx.data.eval_fraction, ctx.data.max_seq_len)
    return PretrainData(ctx.data, ctx.train, ctx.info, train, evals, ctx.tokenizer.pad_token_id)
