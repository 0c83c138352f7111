"""What the loop asks of a task's data, and what building it is given.

Two implementations: `data.sequences.SequenceData` (prepared SFT/DPO samples, planned per step)
and `data.shards.rows.PretrainData` (fixed-length rows of token shards). An objective's
`build_data` returns one of them; the loop only calls the methods below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from ..config import Config, DataConfig, TrainConfig
from .batching import StepPlan


@dataclass
class EvalSet:
    batches: Any  # this rank's micro-batches (len() and iteration; collated lazily); the same count on every rank
    global_weight: int  # normaliser over the whole eval set (all ranks)


class TrainData(Protocol):
    """The data interface of the one loop.

    next_step()  plans this rank's micro-batches of the next optimizer step (a StepPlan with the
                 step's global loss normaliser) and advances the data position; every rank
                 computes the same global figures without communicating.
    batches()    collates a plan's micro-batches into tensors (the loop runs it in a prefetch thread).
    eval_set()   the held-out batches of this rank and their global normaliser, or None.
    state_dict() / load_state_dict()  the data position (+ a fingerprint of the data) a checkpoint keeps.
    prefetch_safe  (optional attribute, default True) False: next_step runs the model (RL rollouts), so
                 the loop plans each step in its own thread, never in the prefetch thread.
    """

    def next_step(self) -> StepPlan: ...

    def batches(self, plan: StepPlan) -> list[dict]: ...

    def eval_set(self) -> Optional[EvalSet]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class DataContext:
    """What building a run's data is given: the sections it reads and who this rank is."""

    data: DataConfig
    train: TrainConfig  # batch shape (micro_batch_size, grad_accum), seed, eval_max_batches
    info: Any  # distributed.DistInfo (rank, world_size, local_world_size, device)
    tokenizer: Any
    tok_hash: str  # data.tokenizer_id.tokenizer_hash(tokenizer): keys the prepared-data cache
    output_dir: str  # prepared data (default cache) and bad-row reports go here
    stale_minutes: float = 10.0  # dist.stale_minutes: a preparing rank whose heartbeat stops this long is gone

    @classmethod
    def of(cls, cfg: Config, tokenizer, info, tok_hash: str) -> "DataContext":
        return cls(cfg.data, cfg.train, info, tokenizer, tok_hash, cfg.output_dir, cfg.dist.stale_minutes)


def data_coordinates(info) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of `info` (distributed.DistInfo): the SP/TP peers of a
    rank read the same rows (distributed/mesh.py). Objects without a mesh (tests' stand-ins): rank, world."""
    return getattr(info, "data_rank", info.rank), getattr(info, "data_world_size", info.world_size)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on `device` (non_blocking: pinned host memory copies asynchronously)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
