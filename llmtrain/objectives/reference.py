"""A reference model (DPO's; online RL's next): adapters disabled, log-probs precomputed once, or a frozen sharded copy."""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as dist
from ..data.protocol import to_device
from ..data.samples import cache_key
from ..models import sequence_parallel


@dataclass(frozen=True)
class RefCache:
    """Where precomputed reference log-probs are cached, and the identity of the model they come from."""

    dir: str  # output_dir/cache
    model_id: tuple  # (model.name_or_path, model.config): a different starting model never reuses the table


def has_adapters(engine) -> bool:
    return hasattr(engine.module, "disable_adapter") and hasattr(engine.module, "peft_config")


@contextlib.contextmanager
def adapters_disabled(engine):
    """The LoRA policy with its adapters switched off *is* the base model: no second copy."""
    with engine.module.disable_adapter():
        yield


def frozen_copy(run):
    """A second copy of the starting model, without optimizer state, sharded like the policy
    under ZeRO-3 (so it costs 1/N of its weights per rank) and replicated otherwise."""
    import deepspeed

    ref_config = copy.deepcopy(run.ds_config)
    ref_config.pop("optimizer", None)
    ref_config.pop("scheduler", None)
    if ref_config.get("zero_optimization", {}).get("stage", 0) != 3:
        ref_config["zero_optimization"] = {"stage": 0}
    model = run.load_model(ref_config)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ref_config)
    engine.eval()
    return engine


def precompute(run, logps_fn, cache: RefCache) -> torch.Tensor:
    """Reference log-probs of every train and eval pair, from the policy before its first step.

    Runs before a resumed checkpoint is loaded, so the policy still holds the starting weights;
    the table is also cached in output_dir/cache, so a resumed run reads it back. Pairs are dealt
    round-robin to ranks and the (pairs, 2) table is summed across ranks.
    """
    data = run.data  # a SequenceData with unit ids
    splits = data.splits()
    total = sum(len(s) for s in splits)
    key = cache_key("ref", *cache.model_id, *(s.fingerprint() for s in splits))
    path = os.path.join(cache.dir, f"ref_logps-{key}.npy")
    if os.path.exists(path):
        table = np.load(path, allow_pickle=False)
        dist.print0(f"dpo: reference log-probs from {path}")
        return torch.from_numpy(table).to(run.info.device)
    table = torch.zeros((total, 2), dtype=torch.float64, device=run.info.device)
    run.engine.eval()
    with torch.no_grad():
        for batch in data.every_unit_batches():
            ids = batch.pop("unit_ids").to(run.info.device)
            chosen, rejected = logps_fn(run.engine, to_device(batch, run.info.device))
            if sequence_parallel.rank() == 0:  # SP peers hold the same (summed) log-probs: count them once
                table[ids, 0] = chosen.double()
                table[ids, 1] = rejected.double()
    run.engine.train()
    table = dist.all_reduce_sum(table)
    if dist.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path + ".tmp.npy", table.cpu().numpy())
        os.replace(path + ".tmp.npy", path)
    dist.print0(f"dpo: precomputed reference log-probs of {total} pairs")
    return table
