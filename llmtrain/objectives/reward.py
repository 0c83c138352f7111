"""Reward models (the second stage of RLHF): a scalar head on a causal LM trained with the
Bradley-Terry loss on preference pairs (losses.bradley_terry_loss).

The model is the architecture's sequence-classification class with one label (models.loading.HEADS
"seq_cls"): the trunk loads from the causal LM's checkpoint, the `score` head (hidden -> 1) is new.
The data are DPO's: the same formats, policies, bad-row accounting and prepared cache (kind "dpo"),
a unit = one (chosen, rejected) pair, the step loss normalised by the step's global pair count.

Where the reward is read: HF's sequence-classification forward pools the rightmost non-pad token of
each *row*, i.e. one value per packed row (and the token before the end when a sequence ends in the
pad id). We read the head's output at every position with a forward hook and take each sequence's
last token ourselves (losses.last_token_values), which is exact for padding, packing and pad == eos;
the head module is still called by the model, so ZeRO-3's hooks gather its weight as for any layer.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import distributed as dist
from ..config import Config, RewardConfig
from ..data.protocol import DataContext
from ..data.sequences import SequenceData, sequence_data
from ..data.shards.recipe import PrepareOptions
from ..data.splits import prepare_splits
from ..errors import ConfigError
from ..losses import bradley_terry_loss, last_token_values
from .base import Objective
from .dpo import _check_prompt_budget
from .lm_forward import model_inputs

HEAD_NAME = "score"  # the sequence-classification head of HF's causal-LM architectures (Generic/GPT2/...)


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The model's `score` module (for a PEFT model its ModulesToSaveWrapper: what the forward calls)."""
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == HEAD_NAME]
    if not names:
        raise ConfigError(f"the model has no `{HEAD_NAME}` head: a reward model needs an architecture whose "
                          "AutoModelForSequenceClassification class has one (Llama, Qwen2, Mistral, GPT-2, ...)")
    return model.get_submodule(min(names, key=len))


def zero_score_head(model: torch.nn.Module) -> None:
    """Every weight of the score head (both PEFT copies) to 0, before the engine takes the weights.
    Under ZeRO-3 the head is partitioned: gathered with rank 0 as the writer (a collective)."""
    params = list(score_head(model).parameters())
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            if dist.is_main():
                for p in params:
                    p.data.zero_()  # .data: an in-place write on a leaf that requires grad
        return
    with torch.no_grad():
        for p in params:
            p.zero_()


@contextlib.contextmanager
def _tap(head: torch.nn.Module):
    """While active, out["values"] holds the head's output of the last forward, (B, T, 1)."""
    out: dict = {}
    handle = head.register_forward_hook(lambda _module, _args, output: out.__setitem__("values", output))
    try:
        yield out
    finally:
        handle.remove()


def position_values(engine, batch: dict) -> torch.Tensor:
    """One forward of a collated batch -> the score head's output at every position, (B, T) fp32
    (differentiable: a PPO critic trains through it). `engine` is a DeepSpeed engine or a bare (PEFT)
    sequence-classification model."""
    model = getattr(engine, "module", engine)
    with _tap(score_head(model)) as out:
        engine(**model_inputs(engine, batch))
    return out["values"][..., 0].float()  # (B, T, 1) -> (B, T)


def sequence_rewards(engine, batch: dict) -> torch.Tensor:
    """One forward of a collated (packed or padded) batch -> the reward of every sequence, (num_seqs,) fp32,
    in batch order (the value at each sequence's last token)."""
    return last_token_values(position_values(engine, batch), batch["seq_index"], batch["num_seqs"])


def pair_rewards(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = sequence_rewards(engine, batch)  # (2P,): sequences alternate chosen, rejected
    pairs = rewards.view(-1, 2)  # (2P,) -> (P, 2)
    return pairs[:, 0], pairs[:, 1]


class Reward(Objective):
    """L = (1 / P_global) * sum over the step's pairs of -log sigmoid(r_c - r_r - m) [+ center_coef (r_c + r_r)^2]."""

    name = "reward"
    summary = "reward model: a scalar head on a causal LM, Bradley-Terry loss on preference pairs"
    head = "seq_cls"
    model_parallel = False  # the reward head's last-token read-out does not see SP slices; TP untested

    def __init__(self, r: RewardConfig):
        self.r = r

    @classmethod
    def from_config(cls, cfg: Config) -> "Reward":
        return cls(cfg.reward)

    def build_data(self, ctx: DataContext) -> SequenceData:
        _check_prompt_budget(ctx)
        # DPO's prepared pairs (same cache entry); one unit = one pair: the loss is a mean over pairs
        return sequence_data(ctx, "dpo", unit_weights=lambda samples: np.ones(len(samples), dtype=np.int64),
                             value_column=self.r.margin_column)

    def prepare_data(self, ctx: DataContext, opts: PrepareOptions) -> None:
        _check_prompt_budget(ctx)
        prepare_splits(ctx, "dpo", opts.workers, value_column=self.r.margin_column)

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.r.zero_head:
            zero_score_head(model)
            dist.print0("reward: score head starts at 0 (every reward 0, first loss ln 2; reward.zero_head=false "
                        "keeps the architecture's random init)")

    def loss(self, engine, batch: dict, global_weight: int):
        r_c, r_r = pair_rewards(engine, batch)
        margin = batch.get("unit_values")  # (P,) per-pair margins (reward.margin_column), else None
        loss_sum, means = bradley_terry_loss(r_c, r_r, margin=margin, center_coef=self.r.center_coef,
                                             reduction="sum")
        pairs = r_c.shape[0]  # 0 in the padding batch of a rank with fewer eval rows (it still ran its forward)
        # means -> sums over pairs (a mean over no pairs is NaN: an empty batch contributes 0)
        sums = {k: v * pairs if pairs else torch.zeros_like(v) for k, v in means.items()}
        return loss_sum / global_weight, sums
