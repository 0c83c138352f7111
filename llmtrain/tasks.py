"""Tasks differ only in their data and their loss; everything else is the shared loop.

A task gives the loop:
  build_data(cfg, tokenizer, info) -> TrainData   what to train and evaluate on
  loss(engine, batch, global_weight) -> (loss, sums)
      `loss` is this micro-batch's share of the step loss (already divided by the step's
      global normaliser); `sums` are detached per-micro-batch sums the loop all-reduces and
      divides by the global normaliser on log steps (e.g. DPO's correctly ranked pairs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import dist
from .config import Config, sources
from .data.batching import BatchPlanner, RowStream, StepPlan, collate_sequences, eval_micro_batches
from .data.samples import SampleSet, build_cached, cache_key
from .data.sources import BadRowReport, expand, fingerprint
from .losses import causal_lm_loss, shift_labels, token_logps_from_logits


@dataclass
class EvalSet:
    batches: list  # this rank's collated micro-batches
    global_weight: int  # normaliser over the whole eval set (all ranks)


class SequenceData:
    """Tokenized sequences in memory: shuffled/packed rows, planned per step (SFT, DPO)."""

    def __init__(self, cfg: Config, info, train: SampleSet, eval_set: Optional[SampleSet], pad_id: int,
                 unit_weights):
        t, d = cfg.train, cfg.data
        self.samples, self.pad_id = train, pad_id
        self.stream = RowStream(train.unit_lengths(), seed=t.seed, packing=d.packing, max_len=self._row_len(cfg))
        self.planner = BatchPlanner(self.stream, unit_weights(train), micro_batch_size=t.micro_batch_size,
                                    grad_accum=t.grad_accum, world_size=info.world_size, rank=info.rank)
        self.eval_samples, self.eval_weights = eval_set, (unit_weights(eval_set) if eval_set is not None else None)
        self.cfg, self.info = cfg, info

    @staticmethod
    def _row_len(cfg: Config) -> int:
        return cfg.data.max_seq_len

    def collate(self, samples: SampleSet, rows: list) -> dict:
        """Packed: a row holds every sequence of its units. Unpacked: one sequence per row (a DPO
        pair becomes two rows, chosen then rejected, so sequence order is the same either way)."""
        if self.cfg.data.packing:
            seq_rows = [[s for u in row for s in samples.unit(u)] for row in rows]
        else:
            seq_rows = [[s] for row in rows for u in row for s in samples.unit(u)]
        return collate_sequences(seq_rows, self.pad_id)

    def next_step(self) -> StepPlan:
        return self.planner.next_step()

    def batches(self, plan: StepPlan) -> list[dict]:
        return [self.collate(self.samples, rows) for rows in plan.micro_batches]

    def eval_set(self) -> Optional[EvalSet]:
        if self.eval_samples is None or len(self.eval_samples) == 0:
            return None
        d, t = self.cfg.data, self.cfg.train
        mbs = eval_micro_batches(self.eval_samples.unit_lengths(), d.packing, self._row_len(self.cfg),
                                 t.micro_batch_size, self.info.world_size, self.info.rank, t.eval_max_batches)
        batches = [self.collate(self.eval_samples, rows) for rows in mbs]
        if t.eval_max_batches:  # a subset: normalise by what all ranks actually evaluate
            used = eval_micro_batches(self.eval_samples.unit_lengths(), d.packing, self._row_len(self.cfg),
                                      t.micro_batch_size, 1, 0, t.eval_max_batches * self.info.world_size)
            weight = int(sum(self.eval_weights[u] for b in used for row in b for u in row))
        else:
            weight = int(self.eval_weights.sum())
        return EvalSet(batches, weight)

    def state_dict(self) -> dict:
        return {**self.planner.state_dict(), "fingerprint": self.samples.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        self.planner.load_state_dict(state)


def _source_files(cfg: Config, key: str) -> list[str]:
    return [p for s in sources(cfg, key) for p in expand(s.path, key) if os.path.isfile(p)]


def load_split(cfg: Config, tokenizer, tok_hash: str, key: str, build_fn) -> SampleSet:
    """Tokenize a split once (rank 0), cached under output_dir/cache keyed by everything that shapes it."""
    d = cfg.data
    srcs = sources(cfg, key)
    files = _source_files(cfg, key)
    ckey = cache_key(key, build_fn.__name__, [(s.path, s.format) for s in srcs], fingerprint(files), tok_hash,
                     d.max_seq_len, d.max_prompt_len, d.truncation)
    path = os.path.join(cfg.output_dir, "cache", f"{key.replace('.', '_')}-{ckey}.npz")

    def build() -> SampleSet:
        report = BadRowReport()
        samples = build_fn(tokenizer, srcs, cfg, key, report)
        report_path = os.path.join(cfg.output_dir, f"bad_rows_{key.split('.')[-1]}.jsonl")
        if report.bad:
            report.write(report_path)
            dist.print0(f"{key}: {report.summary()} (all listed in {report_path})")
        if report.dropped_too_long:
            dist.print0(f"{key}: dropped {report.dropped_too_long} samples longer than data.max_seq_len={d.max_seq_len} (data.truncation=drop)")
        report.check(d.max_bad_fraction, key)
        if len(samples) == 0:
            from .data.sources import DataError

            raise DataError(f"{key}: no usable sample in {', '.join(s.path for s in srcs)}")
        return samples

    return build_cached(path, build)


# --------------------------------------------------------------------------- SFT


def _build_sft(tokenizer, srcs, cfg: Config, key: str, report: BadRowReport) -> SampleSet:
    from .data.sft import build_sft_samples

    return build_sft_samples(tokenizer, srcs, cfg.data.max_seq_len, cfg.data.truncation, key, report)


def lm_forward_logps(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the packed/padded batch; per-token log-probs of the next token (B, T) and shifted labels."""
    out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    targets = shift_labels(batch["labels"])  # (B, T): targets[:, t] = labels[:, t + 1]
    return token_logps_from_logits(out.logits, targets), targets


class SFTTask:
    name = "sft"

    def build_data(self, cfg: Config, tokenizer, info, tok_hash: str) -> SequenceData:
        from .data.sft import split_eval

        train = load_split(cfg, tokenizer, tok_hash, "data.train", _build_sft)
        eval_set = load_split(cfg, tokenizer, tok_hash, "data.eval", _build_sft) if cfg.data.eval else None
        if eval_set is None and cfg.data.eval_fraction > 0:
            train, eval_set = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
        return SequenceData(cfg, info, train, eval_set, tokenizer.pad_token_id, unit_weights=SampleSet.seq_targets)

    def loss(self, engine, batch: dict, global_weight: int):
        token_logps, targets = lm_forward_logps(engine, batch)
        loss, metrics = causal_lm_loss(token_logps, targets, global_weight)
        return loss, {}


TASKS = {"sft": SFTTask}
