"""Deterministic, resumable global batches; padding-free packing; collation to tensors.

The order of training data is a pure function of (seed, position): epoch e shuffles the units
with a generator seeded by (seed, e) and, with packing, packs them greedily (in that order)
into rows of at most data.max_seq_len tokens. Rows form one endless stream; optimizer step s
consumes rows [s*G, (s+1)*G) with G = micro_batch_size * grad_accum * world_size, and rank r's
micro-batch m takes the slice starting at ((m * world_size) + r) * micro_batch_size.

So the whole data position is one integer (rows consumed), every rank knows the global batch
(no communication to count a step's target tokens), and the global batch is the same for any
(world_size, grad_accum) with the same product.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .labels import IGNORE_INDEX


def pack_next_fit(order: np.ndarray, lengths: np.ndarray, max_len: int) -> list[list[int]]:
    """Units in `order` -> rows of consecutive units whose lengths sum to <= max_len.

    Next-fit keeps the shuffled order (so the data order stays a function of the seed) and
    wastes little: rows fill to max_len minus less than one sample.
    """
    bounds = next_fit_bounds(np.asarray(lengths)[np.asarray(order, dtype=np.int64)], max_len)
    units = np.asarray(order).tolist()
    return [units[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def next_fit_bounds(lengths_in_order: np.ndarray, max_len: int) -> np.ndarray:
    """Row boundaries of next-fit packing: row k holds positions [bounds[k], bounds[k+1]) of the order.

    A row starting at s takes the longest run s..e-1 whose lengths sum to <= max_len (at least one
    unit): a binary search on the cumulative lengths, so the Python loop runs once per row, not per unit.
    """
    cum = np.concatenate([[0], np.cumsum(lengths_in_order, dtype=np.int64)])  # (n + 1,)
    n, bounds, s = len(lengths_in_order), [0], 0
    while s < n:
        e = int(np.searchsorted(cum, cum[s] + max_len, side="right")) - 1
        s = max(e, s + 1)
        bounds.append(s)
    return np.asarray(bounds, dtype=np.int64)


class RowStream:
    """Epoch-by-epoch shuffled (and packed) rows of unit indices, addressable by position.

    Memory: per epoch kept (the current one and the one before), the permutation (4 bytes per
    unit) and, with packing, the row boundaries (8 bytes per row): numpy arrays, not Python lists.
    """

    def __init__(self, lengths: np.ndarray, seed: int, packing: bool, max_len: int, shuffle: bool = True):
        if len(lengths) == 0:
            raise ValueError("no training samples left after filtering; check data.train and the bad-row report")
        self.lengths, self.seed, self.packing, self.max_len, self.shuffle = lengths, seed, packing, max_len, shuffle
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (order, row bounds)
        self._starts = [0]  # _starts[e] = first global row index of epoch e

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            n = len(self.lengths)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            order = order.astype(np.int32 if n < 2**31 else np.int64)
            bounds = next_fit_bounds(self.lengths[order], self.max_len) if self.packing else None
            self._epochs = {k: v for k, v in self._epochs.items() if k >= epoch - 1}  # keep memory bounded
            self._epochs[epoch] = (order, bounds)
        return self._epochs[epoch]

    def _num_rows(self, epoch: int) -> int:
        order, bounds = self._epoch(epoch)
        return len(order) if bounds is None else len(bounds) - 1

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        return self._slice(epoch, 0, self._num_rows(epoch))

    def _slice(self, epoch: int, a: int, b: int) -> list[list[int]]:
        """Rows [a, b) of an epoch as lists of unit ids (only what one step needs is materialised)."""
        order, bounds = self._epoch(epoch)
        if bounds is None:
            return [[u] for u in order[a:b].tolist()]
        cuts = bounds[a: b + 1]
        units = order[cuts[0]: cuts[-1]].tolist() if len(cuts) else []
        base = int(cuts[0]) if len(cuts) else 0
        return [units[x - base: y - base] for x, y in zip(cuts[:-1].tolist(), cuts[1:].tolist())]

    def rows(self, start: int, count: int) -> list[list[int]]:
        while self._starts[-1] <= start + count:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + self._num_rows(e))
        out, pos = [], start
        while len(out) < count:
            e = self.epoch_of(pos)
            local = pos - self._starts[e]
            take = self._slice(e, local, min(local + count - len(out), self._starts[e + 1] - self._starts[e]))
            out.extend(take)
            pos += len(take)
        return out

    def epoch_of(self, pos: int) -> int:
        if len(self._starts) <= 1:
            return 0
        return int(np.searchsorted(np.asarray(self._starts[:-1]), pos, side="right")) - 1


@dataclass
class StepPlan:
    micro_batches: list  # this rank's micro-batches: each a list of rows, a row a list of unit ids
    global_weight: int  # normaliser of the step's loss: target tokens (SFT) or pairs (DPO), all ranks
    global_tokens: int  # real (non-padding) tokens of the step, all ranks
    epoch: float  # fractional epoch reached, for logs
    metrics: dict = field(default_factory=dict)  # global figures of the step's data (RL: rollout metrics), logged as is


class BatchPlanner:
    def __init__(self, stream: RowStream, unit_weights: np.ndarray, *, micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int):
        self.stream, self.unit_weights = stream, unit_weights
        self.mbs, self.ga, self.world, self.rank = micro_batch_size, grad_accum, world_size, rank
        self.rows_per_step = micro_batch_size * grad_accum * world_size
        self.rows_consumed = 0

    def next_step(self) -> StepPlan:
        rows = self.stream.rows(self.rows_consumed, self.rows_per_step)
        self.rows_consumed += self.rows_per_step
        mine = []
        for m in range(self.ga):
            start = (m * self.world + self.rank) * self.mbs
            mine.append(rows[start: start + self.mbs])
        units = [u for row in rows for u in row]
        e = self.stream.epoch_of(self.rows_consumed - 1)
        return StepPlan(
            micro_batches=mine,
            global_weight=int(self.unit_weights[units].sum()),
            global_tokens=int(self.stream.lengths[units].sum()),
            epoch=float(e),
        )

    def state_dict(self) -> dict:
        return {"rows_consumed": self.rows_consumed, "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict) -> None:
        self.rows_consumed = int(state["rows_consumed"])


class EvalBatches:
    """Every eval unit exactly once, in file order, rows dealt round-robin to ranks: this rank's
    micro-batches, each a list of rows (lists of unit ids), built when indexed. Holds one numpy array
    of row boundaries (8 bytes per row), never the Python lists of a whole split: DPO's reference
    precompute walks the whole train split this way, on every rank.

    Every rank has the same number of micro-batches (ZeRO-3 gathers are collective): a rank with
    fewer rows gets empty ones at the end."""

    def __init__(self, lengths: np.ndarray, packing: bool, max_len: int, micro_batch_size: int, world_size: int,
                 rank: int, max_batches: int = 0):
        n = len(lengths)
        self.bounds = next_fit_bounds(np.asarray(lengths), max_len) if packing else np.arange(n + 1, dtype=np.int64)
        self.n_rows, self.mbs, self.world, self.rank = len(self.bounds) - 1, micro_batch_size, world_size, rank
        self.mine = len(range(rank, self.n_rows, world_size))  # rows dealt to this rank
        n_batches = -(-(-(-self.n_rows // world_size)) // micro_batch_size)
        self.n_batches = min(n_batches, max_batches) if max_batches else n_batches

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, b: int) -> list[list[int]]:
        if not 0 <= b < self.n_batches:
            raise IndexError(b)
        local = range(b * self.mbs, min((b + 1) * self.mbs, self.mine))
        rows = [self.rank + self.world * k for k in local]  # global row ids
        return [list(range(int(self.bounds[r]), int(self.bounds[r + 1]))) for r in rows]

    def __iter__(self):
        for b in range(self.n_batches):
            yield self[b]

    def units_evaluated(self) -> int:
        """Units [0, this) are what all ranks together evaluate (all of them without max_batches)."""
        rows = min(self.n_rows, self.n_batches * self.mbs * self.world)
        return int(self.bounds[rows])


def eval_micro_batches(lengths: np.ndarray, packing: bool, max_len: int, micro_batch_size: int, world_size: int,
                       rank: int, max_batches: int = 0) -> EvalBatches:
    """This rank's eval micro-batches (see EvalBatches)."""
    return EvalBatches(lengths, packing, max_len, micro_batch_size, world_size, rank, max_batches)


def collate_sequences(seqs: list[list[tuple[np.ndarray, np.ndarray]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of sequences -> padded tensors (right padding), with the sample boundaries spelled out.

    Within a row, position_ids restart at 0 for each sequence: on sdpa/eager/flex transformers
    builds a block-diagonal causal mask from them, provided no attention_mask and no cache is
    passed. flash-attn gets the boundaries explicitly instead (`cu_seq_lens`, `max_segment_len`,
    passed by `tasks.lm_forward_logps`): transformers infers them from position_ids only for a
    batch of one row and otherwise runs plain causal attention over each whole row, letting packed
    samples see each other. The first label of each sequence is masked: nothing before it in the
    row belongs to its sample. Padding continues the last sequence's positions; causal attention
    means real tokens never look at it, so unpacked batches need no attention_mask either (and
    keep sdpa's fast causal path).

    Returns input_ids, labels, position_ids (B, L); seq_index (B, L): the sequence number (in the
    order given) of every position, -1 on padding, used to sum per-sequence log-probs; num_seqs,
    the number of sequences (an int); and the varlen boundaries over the micro-batch flattened to
    one row of B*L tokens: cu_seq_lens (S+1,) int32, the start of every segment and the token
    count, where segments are the sequences in order and each row's padding tail as a segment of
    its own (so padding never joins a sample, and every token is in a segment as flash-attn
    requires), and max_segment_len, the longest segment (an int).
    """
    width = max((sum(len(i) for i, _ in row) for row in seqs), default=1) or 1
    B = max(1, len(seqs))
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    seq_index = torch.full((B, width), -1, dtype=torch.long)
    segment_lens: list[int] = []
    k = 0
    for b in range(B):
        pos = 0
        for ids, lab in seqs[b] if b < len(seqs) else []:
            n = len(ids)
            input_ids[b, pos: pos + n] = torch.from_numpy(ids.astype(np.int64))
            labels[b, pos: pos + n] = torch.from_numpy(lab.astype(np.int64))
            labels[b, pos] = IGNORE_INDEX
            position_ids[b, pos: pos + n] = torch.arange(n)
            seq_index[b, pos: pos + n] = k
            segment_lens.append(n)
            pos += n
            k += 1
        if pos < width:
            last = int(position_ids[b, pos - 1]) + 1 if pos else 0
            position_ids[b, pos:] = torch.arange(last, last + width - pos)
            segment_lens.append(width - pos)
    cu_seq_lens = torch.tensor(np.concatenate([[0], np.cumsum(segment_lens)]), dtype=torch.int32)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_index": seq_index,
            # Python ints: reading them must not sync the device
            "num_seqs": k, "cu_seq_lens": cu_seq_lens, "max_segment_len": max(segment_lens)}
