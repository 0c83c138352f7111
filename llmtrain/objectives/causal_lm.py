"""Next-token cross entropy over every target token: pretraining and SFT, which differ only in their data.

SFT trains on chat samples (assistant tokens only, prepared into the cache); pretraining on
fixed-length rows of token shards. The loss is the same function (losses.causal_lm_loss) on the
same forward (lm_forward.lm_forward_logps), normalised by the step's global target-token count.
"""
from __future__ import annotations

import math

import torch

from ..config import Config
from ..data.protocol import DataContext, EvalSet
from ..data.sequences import SequenceData, sequence_data
from ..data.shards.recipe import PrepareOptions, prepare_shards
from ..data.shards.rows import PretrainData, pretrain_data
from ..data.splits import prepare_splits
from ..losses import causal_lm_loss
from .base import Objective
from .lm_forward import lm_forward_logps


class CausalLM(Objective):
    """L = -(1 / N_global) * sum of log p(target) over the step's target tokens (all micro-batches, all ranks)."""

    def __init__(self, chunk_tokens: int = 0):
        self.chunk_tokens = chunk_tokens  # train.loss_chunk_tokens: LM-head chunk (0 = full logits)

    @classmethod
    def from_config(cls, cfg: Config) -> "CausalLM":
        return cls(chunk_tokens=cfg.train.loss_chunk_tokens)

    def loss(self, engine, batch: dict, global_weight: int):
        token_logps, targets = lm_forward_logps(engine, batch, self.chunk_tokens)
        loss, _ = causal_lm_loss(token_logps, targets, global_weight)
        return loss, {}

    def evaluate(self, engine, eval_set: EvalSet, device: torch.device) -> dict[str, float]:
        row = super().evaluate(engine, eval_set, device)
        row["eval_ppl"] = math.exp(min(row["eval_loss"], 50))  # capped: an untrained model's loss overflows exp
        return row


class SFT(CausalLM):
    """Supervised fine-tuning on chat rows: each sample's weight is its number of target tokens."""

    name = "sft"
    summary = "supervised fine-tuning on chat data (assistant turns trained)"

    def build_data(self, ctx: DataContext) -> SequenceData:
        return sequence_data(ctx, "sft", unit_weights=lambda samples: samples.seq_targets())

    def prepare_data(self, ctx: DataContext, opts: PrepareOptions) -> None:
        prepare_splits(ctx, "sft", opts.workers)


class Pretrain(CausalLM):
    """Pretraining on prepared token shards (`llmtrain prepare` tokenizes the raw corpora first)."""

    name = "pretrain"
    summary = "pretraining on token shards (`llmtrain prepare` makes them first)"

    def build_data(self, ctx: DataContext) -> PretrainData:
        return pretrain_data(ctx)

    def prepare_data(self, ctx: DataContext, opts: PrepareOptions) -> None:
        prepare_shards(ctx.data, ctx.tokenizer, opts)
