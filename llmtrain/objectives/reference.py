"""DPO reference model: adapters disabled, log-probs precomputed once, or a frozen sharded copy."""
from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import torch

from . import dist
from .data.batching import eval_micro_batches
from .data.samples import cache_key


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

    from .models import load_model

    ref_config = copy.deepcopy(run.ds_config)
    ref_config.pop("optimizer", None)
    ref_config.pop("scheduler", None)
    if ref_config.get("zero_optimization", {}).get("stage", 0) != 3:
        ref_config["zero_optimization"] = {"stage": 0}
    model = load_model(run.cfg, run.tokenizer, ref_config, run.precision, run.info.device)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ref_config)
    engine.eval()
    return engine


def precompute(run, logps_fn) -> torch.Tensor:
    """Reference log-probs of every train and eval pair, from the policy before its first step.

    Runs before a resumed checkpoint is loaded, so the policy still holds the starting weights;
    the table is also cached in output_dir/cache, so a resumed run reads it back. Pairs are dealt
    round-robin to ranks and the (pairs, 2) table is summed across ranks.
    """
    data, cfg = run.data, run.cfg
    splits = [data.samples] + ([data.eval_samples] if data.eval_samples is not None else [])
    total = sum(len(s) for s in splits)
    key = cache_key("ref", cfg.model.name_or_path, cfg.model.config, *(s.fingerprint() for s in splits))
    path = os.path.join(cfg.output_dir, "cache", f"ref_logps-{key}.npy")
    if os.path.exists(path):
        table = np.load(path, allow_pickle=False)
        dist.print0(f"dpo: reference log-probs from {path}")
        return torch.from_numpy(table).to(run.info.device)
    table = torch.zeros((total, 2), dtype=torch.float64, device=run.info.device)
    run.engine.eval()
    t = cfg.train
    with torch.no_grad():
        for samples in splits:
            batches = eval_micro_batches(samples.unit_lengths(), cfg.data.packing, cfg.data.max_seq_len * 2,
                                         t.micro_batch_size, run.info.world_size, run.info.rank)
            for rows in batches:
                batch = data.collate(samples, rows)
                ids = batch.pop("unit_ids").to(run.info.device)
                chosen, rejected = logps_fn(run.engine, {k: v.to(run.info.device) if torch.is_tensor(v) else v for k, v in batch.items()})
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
