"""SFT/DPO data for the loop: prepared samples -> shuffled (packed) rows, planned per optimizer step.

A *unit* is what is sampled together: one SFT sequence, or one DPO pair (chosen, rejected). The
planner (batching.BatchPlanner) deals each step's rows to the ranks and computes the step's global
loss normaliser from the unit weights (target tokens for SFT, 1 per pair for DPO).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..config import DataConfig, TrainConfig
from .batching import BatchPlanner, RowStream, StepPlan, collate_sequences, eval_micro_batches
from .protocol import DataContext, EvalSet, data_coordinates
from .sft import split_eval
from .splits import load_split


class LazyBatches:
    """This rank's eval micro-batches, collated when iterated: the eval set is never held as tensors.
    The next batch is read and collated in a background thread while the model runs on this one
    (the reads are preads that release the GIL; on a network file system they are latency-bound)."""

    def __init__(self, collate, samples, micro_batches):
        self.collate, self.samples, self.micro_batches = collate, samples, micro_batches

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="eval-prefetch") as pool:
            pending = None
            for rows in self.micro_batches:
                ahead = pool.submit(self.collate, self.samples, rows)
                if pending is not None:
                    yield pending.result()
                pending = ahead
            if pending is not None:
                yield pending.result()


class SequenceData:
    """Tokenized sequences (prepared on disk, read by position): shuffled/packed rows, planned per step (SFT, DPO).
    `train`/`eval_set` are samples.SampleStore (or a view of one, or an in-memory SampleSet).

    unit_weights(samples) -> (units,) the loss normaliser's share of each unit. unit_ids: each
    batch also carries the ids of its units ("unit_ids", eval units numbered after the train units),
    for values computed once per unit before training (DPO's precomputed reference log-probs)."""

    def __init__(self, d: DataConfig, t: TrainConfig, info, train, eval_set, pad_id: int,
                 unit_weights: Callable[..., np.ndarray], unit_ids: bool = False):
        self.samples, self.pad_id, self.packing, self.unit_ids = train, pad_id, d.packing, unit_ids
        self.row_len = d.max_seq_len * train.seqs_per_unit  # a packed row holds at least one whole unit
        self.stream = RowStream(train.unit_lengths(), seed=t.seed, packing=d.packing, max_len=self.row_len)
        self.planner = BatchPlanner(self.stream, unit_weights(train), micro_batch_size=t.micro_batch_size,
                                    grad_accum=t.grad_accum, world_size=data_coordinates(info)[1],
                                    rank=data_coordinates(info)[0])
        self.eval_samples, self.eval_weights = eval_set, (unit_weights(eval_set) if eval_set is not None else None)
        self.micro_batch_size, self.eval_max_batches, self.info = t.micro_batch_size, t.eval_max_batches, info

    def collate(self, samples, rows: list, got: Optional[dict] = None) -> dict:
        """Packed: a row holds every sequence of its units. Unpacked: one sequence per row (a DPO
        pair becomes two rows, chosen then rejected, so sequence order is the same either way).
        `got`: the sequences already read ({seq id: (ids, labels)}), else read here in one sorted pass."""
        k = samples.seqs_per_unit
        if got is None:
            got = samples.read_seqs(_seq_ids([rows], k))
        unit = lambda u: [got[u * k + j] for j in range(k)]  # noqa: E731
        if self.packing:
            seq_rows = [[s for u in row for s in unit(u)] for row in rows]
        else:
            seq_rows = [[s] for row in rows for u in row for s in unit(u)]
        batch = collate_sequences(seq_rows, self.pad_id)
        values = samples.unit_values()
        if values is not None:  # (units,) -> this batch's units in sequence order (the reward margin)
            batch["unit_values"] = torch.from_numpy(values[[u for row in rows for u in row]].astype(np.float32))
        if self.unit_ids:
            offset = 0 if samples is self.samples else len(self.samples)  # eval units follow train units
            batch["unit_ids"] = torch.tensor([offset + u for row in rows for u in row], dtype=torch.long)
        return batch

    def next_step(self) -> StepPlan:
        return self.planner.next_step()

    def batches(self, plan: StepPlan) -> list[dict]:
        # the whole step's sequences in one sorted pass: reads in file order, one lock acquisition
        got = self.samples.read_seqs(_seq_ids(plan.micro_batches, self.samples.seqs_per_unit))
        return [self.collate(self.samples, rows, got) for rows in plan.micro_batches]

    def eval_set(self) -> Optional[EvalSet]:
        if self.eval_samples is None or len(self.eval_samples) == 0:
            return None
        (rank, world), mbs = data_coordinates(self.info), self.micro_batch_size
        lengths = self.eval_samples.unit_lengths()
        mine = eval_micro_batches(lengths, self.packing, self.row_len, mbs, world, rank, self.eval_max_batches)
        batches = LazyBatches(self.collate, self.eval_samples, mine)
        # with eval_max_batches a subset: normalise by what all ranks actually evaluate (units in file order)
        weight = int(np.asarray(self.eval_weights)[:mine.units_evaluated()].sum())
        return EvalSet(batches, weight)

    # --- every unit once, before training ---
    def splits(self) -> list:
        """The train samples, then the eval samples if any (unit ids count through both, in this order)."""
        return [self.samples] + ([self.eval_samples] if self.eval_samples is not None else [])

    def every_unit_batches(self) -> Iterator[dict]:
        """This rank's share of every train and eval unit (dealt round-robin by eval_micro_batches),
        collated as for training."""
        rank, world = data_coordinates(self.info)
        for samples in self.splits():
            for rows in eval_micro_batches(samples.unit_lengths(), self.packing, self.row_len, self.micro_batch_size,
                                           world, rank):
                yield self.collate(samples, rows)

    # --- resume ---
    def state_dict(self) -> dict:
        return {**self.planner.state_dict(), "fingerprint": self.samples.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        self.planner.load_state_dict(state)


def _seq_ids(micro_batches: list, seqs_per_unit: int) -> list[int]:
    k = seqs_per_unit
    return [u * k + j for rows in micro_batches for row in rows for u in row for j in range(k)]


def sequence_data(ctx: DataContext, kind: str, unit_weights: Callable[..., np.ndarray],
                  unit_ids: bool = False, value_column: Optional[str] = None) -> SequenceData:
    """data.train (and data.eval, or a data.eval_fraction split of train) prepared as `kind`
    ("sft" | "dpo") sequences, ready for the loop; value_column: a per-unit number each batch carries
    as "unit_values" (the reward model's margin)."""
    train = load_split(ctx, "data.train", kind, value_column)
    eval_set = load_split(ctx, "data.eval", kind, value_column) if ctx.data.eval else None
    if eval_set is None and ctx.data.eval_fraction > 0:
        train, eval_set = split_eval(train, ctx.data.eval_fraction, ctx.train.seed)
    return SequenceData(ctx.data, ctx.train, ctx.info, train, eval_set, ctx.tokenizer.pad_token_id,
                        unit_weights=unit_weights, unit_ids=unit_ids)
