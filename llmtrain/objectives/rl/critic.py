"""PPO's critic (rl.advantage=gae): a value model trained next to the policy, as in DeepSpeed-Chat,
OpenRLHF and TRL's PPOTrainer.

The critic is the architecture's sequence-classification model (num_labels 1) loaded from rl.critic
(default rl.reward_model: the critic starts as the reward model, DeepSpeed-Chat / OpenRLHF
`critic_pretrain`). Its `score` head is read at every position through the reward task's tap
(objectives.reward.position_values): the value at the position that predicts completion token t is
V_t, the same alignment as the policy's target log-probs.

It is a second DeepSpeed engine with its own AdamW and LR schedule (rl.critic_lr, train.*'s schedule),
the same ZeRO stage and precision as the policy (sharded under ZeRO-3), built by the runner's
new_engine, i.e. driven by the same EngineAdapter as the policy: the same backward re-scaling and
accumulation boundary, so 2 ranks == 1 rank with accumulation holds for it too. One critic
backward per policy micro-batch, its engine.step() at the same boundary as the policy's.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch

from ... import distributed as dist
from ...config import RLConfig, TrainConfig
from ...data.tokenizer_id import vocab_hash
from ...errors import ConfigError
from ...losses.rl import value_loss_sum
from ..dpo import disable_dropout
from ..reward import position_values


def check_critic_dir(path: str, tokenizer) -> None:
    """The critic reads the policy's token ids (the reward model re-encodes text, the critic cannot): a
    critic directory whose tokenizer has another vocabulary is one error line, not meaningless values.
    A LoRA reward model's final/ (an adapter) is refused with the directory to use instead."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ConfigError(f"rl.critic: {path} is a LoRA adapter; the critic starts from a whole model: use its "
                          "merged/ directory (the reward run with lora.merge=true), or set rl.critic to another model")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return  # a bare model directory: load_model still checks the embedding covers the policy's vocabulary
    from transformers import AutoTokenizer

    if vocab_hash(AutoTokenizer.from_pretrained(path)) != vocab_hash(tokenizer):
        raise ConfigError(f"rl.critic: {path} has another tokenizer than the policy; the critic scores the "
                          "policy's token ids, so it needs the policy's vocabulary (a reward model trained from "
                          "the policy's family), or set rl.critic to such a model")


class Critic:
    def __init__(self, adapter, r: RLConfig):
        self.adapter, self.r = adapter, r

    @classmethod
    def build(cls, run, r: RLConfig, t: TrainConfig) -> "Critic":
        path = r.critic or r.reward_model
        check_critic_dir(path, run.tokenizer)
        ds_config = copy.deepcopy(run.ds_config)  # same ZeRO stage, precision and batch settings as the policy
        model = run.load_model(ds_config, name_or_path=path, head="seq_cls")
        disable_dropout(model)  # the rollout's values and the first update's values of a token must agree
        t_critic = dataclasses.replace(t, lr=r.critic_lr if r.critic_lr is not None else t.lr)
        dist.print0(f"rl: critic from {path} (lr {t_critic.lr:g}, value clip {r.value_clip}, vf_coef {r.vf_coef}, "
                    f"gamma {r.gamma}, lambda {r.lam})")
        return cls(run.new_engine(model, t_critic, ds_config), r)

    @property
    def engine(self):
        return self.adapter.engine

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """(B, T) values at every position (no gradient): the rollout's V_old. Under ZeRO-3 a
        collective (the engine's hooks gather each layer): every rank calls it as often."""
        return position_values(self.engine, batch)

    def update(self, batch: dict, mask: torch.Tensor, global_weight: int, boundary: bool) -> dict:
        """Forward, clipped value loss (token-mean over the step's global mini-batch, the policy loss's
        normaliser), backward and engine.step() of one micro-batch; boundary: the step's last one.
        Returns detached sums for the step's metrics (the loop divides them by global_weight)."""
        values = position_values(self.engine, batch)  # (B, T)
        loss_sum, m = value_loss_sum(values, batch["old_values"], batch["returns"], mask, self.r.value_clip)
        self.adapter.backward(self.r.vf_coef * loss_sum / max(global_weight, 1))
        self.adapter.step(boundary=boundary)
        if boundary and self.adapter.step_skipped():
            dist.warn("rl: the critic's update was skipped (non-finite value loss or gradient)")
        zero = torch.zeros_like(values)
        return {"value_loss": loss_sum.detach(), "value_clip_frac": m["clipped_tokens"].double(),
                "value": torch.where(mask, values.detach(), zero).sum(),
                "return": torch.where(mask, batch["returns"], zero).sum()}
