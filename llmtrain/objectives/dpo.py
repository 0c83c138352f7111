"""DPO and its variants on preference pairs: one forward over chosen and rejected together, the
reference model's log-probs beside them, a preference loss from losses.PREFERENCE_LOSSES.

The reference model is, in order of preference: the policy with its LoRA adapters disabled (no
second copy), log-probs precomputed once before training (dpo.precompute_ref), or a frozen copy
sharded like the policy (reference.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import distributed as dist
from ..config import Config, DPOConfig
from ..data.protocol import DataContext
from ..data.sequences import SequenceData, sequence_data
from ..data.shards.recipe import PrepareOptions
from ..data.splits import prepare_splits
from ..errors import ConfigError
from ..losses import PREFERENCE_LOSSES, chosen_nll_loss, packed_sequence_logps
from ..models import sequence_parallel
from . import reference
from .base import Objective, RunContext
from .lm_forward import aligned, lm_forward_logps


def pair_logps(engine, batch: dict, chunk_tokens: int = 0, with_lengths: bool = False):
    """One forward over chosen and rejected together -> summed response log-probs, each (pairs,);
    with_lengths also returns the responses' target-token counts, (pairs, 2): chosen, rejected."""
    batch = aligned(batch)  # pre-shifted targets and sequence ids (under SP: this rank's slice)
    token_logps, targets = lm_forward_logps(engine, batch, chunk_tokens)
    seq_ids = batch["target_seq_index"]  # (B, T): sequence of the token each position predicts, -1 if untrained
    # (2P,); under SP each rank's sums cover its slice only: summed over the SP group (differentiable)
    logps = sequence_parallel.sp_sum(packed_sequence_logps(token_logps, targets, seq_ids, batch["num_seqs"]))
    pairs = logps.view(-1, 2)  # (2P,) -> (P, 2): sequences alternate chosen, rejected
    if not with_lengths:
        return pairs[:, 0], pairs[:, 1]
    ones = torch.ones_like(token_logps)
    lengths = sequence_parallel.sp_sum(packed_sequence_logps(ones, targets, seq_ids, batch["num_seqs"])).view(-1, 2)  # (P, 2) token counts
    return pairs[:, 0], pairs[:, 1], lengths


def disable_dropout(model: torch.nn.Module) -> int:
    """p = 0 in every dropout module and in every float `*dropout` attribute a module reads at
    forward time (Llama/Qwen2/Mistral attention keeps `attention_dropout` as a float). TRL does the
    same for preference training (it only handles nn.Dropout). LoRA's `lora_dropout` modules are
    kept: lora.dropout is an explicit setting, and the adapter-disabled reference never runs them.
    The model's config is left alone, so final/ keeps the user's dropout values. Returns the count."""
    switched = 0
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            switched += 1
        for attr, value in list(vars(module).items()):
            if attr.endswith("dropout") and isinstance(value, float) and value > 0:
                setattr(module, attr, 0.0)
                switched += 1
    return switched


class DPO(Objective):
    """Preference optimisation against a reference model (dpo.loss: sigmoid = DPO, ipo, hinge)."""

    name = "dpo"
    summary = "preference optimisation (DPO, IPO, hinge; + RPO's NLL term) against a reference model"

    def __init__(self, d: DPOConfig, chunk_tokens: int = 0, ref_cache: reference.RefCache | None = None):
        self.d, self.chunk_tokens, self.ref_cache = d, chunk_tokens, ref_cache
        self.preference_loss = PREFERENCE_LOSSES[d.loss]
        self.ref_engine = None  # frozen copy (full fine-tuning without precompute)
        self.ref_table = None  # (pairs, 2) float64 reference log-probs, indexed by unit id

    @classmethod
    def from_config(cls, cfg: Config) -> "DPO":
        cache = reference.RefCache(os.path.join(cfg.output_dir, "cache"), (cfg.model.name_or_path, cfg.model.config))
        return cls(cfg.dpo, chunk_tokens=cfg.train.loss_chunk_tokens, ref_cache=cache)

    def build_data(self, ctx: DataContext) -> SequenceData:
        _check_prompt_budget(ctx)
        # one unit = one pair: the loss is normalised by the step's pair count; unit ids find the
        # precomputed reference log-probs of each pair
        return sequence_data(ctx, "dpo", unit_weights=lambda samples: np.ones(len(samples), dtype=np.int64),
                             unit_ids=True)

    def prepare_data(self, ctx: DataContext, opts: PrepareOptions) -> None:
        _check_prompt_budget(ctx)
        prepare_splits(ctx, "dpo", opts.workers)

    def setup(self, run: RunContext) -> None:
        """Set up the reference before any training step (and before a resume loads weights)."""
        if self.d.disable_dropout:
            switched = disable_dropout(run.engine.module)
            if switched:
                dist.print0(f"dpo: dropout off in the policy ({switched} dropout settings; dpo.disable_dropout=false keeps them)")
        lora = reference.has_adapters(run.engine)
        dist.print0(f"dpo: reference = {'adapters_disabled' if lora else 'precomputed' if self.d.precompute_ref else 'frozen_copy'}")
        if lora:
            return
        if self.d.precompute_ref:
            self.ref_table = reference.precompute(run, self._policy_logps_for_ref, self.ref_cache)
        else:
            self.ref_engine = reference.frozen_copy(run)

    def _policy_logps_for_ref(self, engine, batch):
        return pair_logps(engine, batch, self.chunk_tokens)

    def _ref_logps(self, engine, batch):
        if self.ref_table is not None:
            units = batch["unit_ids"]
            return self.ref_table[units, 0], self.ref_table[units, 1]
        with torch.no_grad():
            if self.ref_engine is not None:
                return pair_logps(self.ref_engine, batch, self.chunk_tokens)
            with reference.adapters_disabled(engine):
                return pair_logps(engine, batch, self.chunk_tokens)

    def loss(self, engine, batch: dict, global_weight: int):
        d = self.d
        ref_c, ref_r = self._ref_logps(engine, batch)
        pol_c, pol_r, lengths = pair_logps(engine, batch, self.chunk_tokens, with_lengths=True)
        ref_c, ref_r = ref_c.to(pol_c.dtype), ref_r.to(pol_r.dtype)
        nll_sum = chosen_nll_loss(pol_c, lengths[:, 0], reduction="sum")
        loss_sum, means = self.preference_loss(pol_c, pol_r, ref_c, ref_r, lengths, d.beta, reduction="sum",
                                               label_smoothing=d.label_smoothing)
        pairs = pol_c.shape[0]  # 0 in the padding batch of a rank with fewer eval rows (it still ran its forwards)
        # means -> sums over pairs (a mean over no pairs is NaN: an empty batch contributes 0)
        sums = {k: v * pairs if pairs else torch.zeros_like(v) for k, v in means.items()}
        sums["chosen_nll"] = nll_sum.detach()
        if d.nll_weight:
            sums["preference_loss"] = loss_sum.detach()
            loss_sum = loss_sum + d.nll_weight * nll_sum
        # under SP every rank of the group holds the same pair losses (sp_sum above): each contributes
        # 1/SP, so the world all-reduce of loss and sums and the summed gradients stay exact
        sp = sequence_parallel.size()
        if sp > 1:
            sums = {k: v / sp for k, v in sums.items()}
        return loss_sum / (global_weight * sp), sums


def _check_prompt_budget(ctx: DataContext) -> None:
    d = ctx.data
    if d.max_prompt_len >= d.max_seq_len:
        raise ConfigError(f"{d.where('data.max_prompt_len')}: data.max_prompt_len={d.max_prompt_len} must be "
                          f"below data.max_seq_len={d.max_seq_len} to leave the response a budget")
