"""Online RL (`llmtrain rl`): rollouts from the policy being trained, rewards from Python functions
and/or a reward model, group advantages (GRPO, Dr. GRPO, RLOO) or PPO with a learned critic (GAE),
the clipped surrogate against the rollout's log-probs, optionally a KL to a reference model (k3 loss
term or k1 reward penalty).

Modules: prompts.py (prompt rows), generation.py (hf backend, ZeRO-3), vllm_backend.py (the vllm
backend: colocated vLLM, weight sync), sampling.py (keyed sampler),
rewards.py (reward functions, the exact-match verifier), rollout.py (the loop's data: one rollout
every ppo_epochs x mini_batches optimizer steps), critic.py (PPO's value model and its engine); the
losses are llmtrain/losses/rl.py.
"""
from __future__ import annotations

import torch

from ... import distributed as dist
from ...config import Config, RLConfig, TrainConfig
from ...data.labels import IGNORE_INDEX
from ...data.protocol import DataContext, EvalSet
from ...data.shards.recipe import PrepareOptions
from ...data.splits import prepare_splits
from ...errors import ConfigError
from ...losses import shift_labels, token_logps_from_logits
from ...losses.rl import kl_k1_tokens, kl_k3_tokens, masked_entropy_sum, policy_loss_sum
from ...tools.generate import stop_token_ids
from .. import reference
from ..base import Objective, RunContext
from ..dpo import disable_dropout
from ..lm_forward import lm_forward_logps, model_inputs
from . import generation, vllm_backend
from .critic import Critic
from .prompts import load_prompts
from .rewards import RewardFn, RewardModelFn, load_reward_fns, score
from .rollout import RolloutData


class RL(Objective):
    """GRPO / RLOO / PPO (gae) on rollouts of the policy (rl.advantage), rewards from rl.reward_fns and rl.reward_model."""

    name = "rl"
    summary = ("online RL from the policy's own rollouts: GRPO, Dr. GRPO, RLOO, PPO with a critic "
               "(rewards: Python verifiers, a reward model)")
    model_parallel = False  # rollouts generate with whole sequences on every rank; SP/TP untested

    def __init__(self, r: RLConfig, chunk_tokens: int = 0, t: TrainConfig | None = None):
        self.r, self.chunk_tokens, self.t = r, chunk_tokens, t or TrainConfig()
        self.data: RolloutData | None = None
        self.ref_engine = None
        self.critic: Critic | None = None
        self.use_adapters_off = False
        self.vllm: vllm_backend.VLLMBackend | None = None  # rl.generation_backend=vllm: built in setup
        self.model_cfg, self.seed = None, 0

    @classmethod
    def from_config(cls, cfg: Config) -> "RL":
        r = cfg.rl
        if r.generation_backend == "vllm":
            vllm_backend.check_config(r, cfg.model, cfg.lora)
        if not r.reward_fns and r.reward_model is None:
            raise ConfigError(f"{r.where('rl.reward_fns')}: rl.reward_fns is empty; name at least one reward function "
                              "(e.g. llmtrain.objectives.rl.rewards:exact_match) or set rl.reward_model")
        obj = cls(r, chunk_tokens=cfg.train.loss_chunk_tokens, t=cfg.train)
        obj.model_cfg, obj.seed = cfg.model, cfg.train.seed
        return obj

    def build_data(self, ctx: DataContext) -> RolloutData:
        fns = load_reward_fns(self.r.reward_fns, self.r.reward_weights, self.r.where)
        if self.r.reward_model is not None:
            fns.append(RewardFn("reward_model", RewardModelFn(self.r.reward_model, ctx.info.device), 1.0))
        prompts = load_prompts(ctx, "data.train")
        evals = load_prompts(ctx, "data.eval") if ctx.data.eval else None
        pack_len = ctx.data.max_seq_len if ctx.data.packing else None
        if pack_len is not None and pack_len < ctx.data.max_prompt_len + self.r.max_new_tokens:
            raise ConfigError(f"{ctx.data.where('data.max_seq_len')}: data.max_seq_len={pack_len} is the packed row "
                              f"length and must hold a whole sequence, data.max_prompt_len + rl.max_new_tokens = "
                              f"{ctx.data.max_prompt_len + self.r.max_new_tokens}; raise it (or set data.packing=false)")
        self.data = RolloutData(self.r, ctx.train, prompts, evals, ctx.tokenizer, ctx.info, fns,
                                stop_token_ids(ctx.tokenizer), pack_len)
        dist.print0(f"rl: {len(prompts)} prompts ({len(evals) if evals else 0} eval), {self.r.prompts_per_step} x "
                    f"{self.r.num_generations} samples per rollout, a rollout every "
                    f"{self.r.ppo_epochs * self.r.mini_batches} optimizer step(s), advantage {self.r.advantage}"
                    + (f"; each micro-batch packed into rows of <= {pack_len} tokens" if pack_len else ""))
        return self.data

    def prepare_data(self, ctx: DataContext, opts: PrepareOptions) -> None:
        prepare_splits(ctx, "rl", opts.workers)  # the prompts, where build_data finds them

    def setup(self, run: RunContext) -> None:
        disable_dropout(run.engine.module)  # old/ref/new log-probs of one sequence must agree at ratio 1
        ref = None
        if self.r.kl_coef > 0:
            if reference.has_adapters(run.engine):
                self.use_adapters_off = True
                ref = self._ref_adapters_off
            else:
                self.ref_engine = reference.frozen_copy(run)
                ref = self._ref_frozen
            dist.print0(f"rl: reference = {'adapters_disabled' if self.use_adapters_off else 'frozen_copy'}, "
                        f"KL {self.r.kl_type} x {self.r.kl_coef}")
        if self.r.advantage == "gae":
            self.critic = Critic.build(run, self.r, self.t)
        stage = int(run.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.data.attach(run.engine, stage, lambda b: self._logps(run.engine, b)[0], ref,
                         self.critic.values if self.critic is not None else None)
        self.stage, self.engine = stage, run.engine
        if self.r.generation_backend == "vllm":
            self.vllm = vllm_backend.VLLMBackend(self.r, self.model_cfg, vllm_backend.vllm_dtype(run.ds_config),
                                                 self.seed, run.info, vllm_backend.max_model_len(self.r, self.data))
            self.data.vllm = self.vllm

    def extra_engines(self) -> dict:
        return {"critic": self.critic.engine} if self.critic is not None else {}

    def _logps(self, engine, batch: dict, with_entropy: bool = False):
        """(target log-probs (B, T), summed entropy over the targets or None, targets). Entropy needs the
        logits: the unchunked head (train.loss_chunk_tokens=0) only."""
        if self.chunk_tokens > 0:
            logps, targets = lm_forward_logps(engine, batch, self.chunk_tokens)
            return logps, None, targets
        targets = shift_labels(batch["labels"])
        logits = engine(**model_inputs(engine, batch)).logits
        entropy = masked_entropy_sum(logits, targets != IGNORE_INDEX) if with_entropy else None
        return token_logps_from_logits(logits, targets), entropy, targets

    def _ref_frozen(self, batch):
        return self._logps(self.ref_engine, batch)[0]

    def _ref_adapters_off(self, batch):
        with reference.adapters_disabled(self.engine):
            return self._logps(self.engine, batch)[0]

    def loss(self, engine, batch: dict, global_weight: int):
        r = self.r
        logps, entropy, targets = self._logps(engine, batch, with_entropy=True)
        mask = targets != IGNORE_INDEX
        old = batch["old_logp"] if "old_logp" in batch else logps.detach()
        loss_sum, m = policy_loss_sum(logps, old, batch["adv"], mask, r.clip_low, r.clip_high)
        zero = torch.zeros_like(logps)
        sums = {"policy_loss": loss_sum.detach(), "clip_frac": m["clipped_tokens"].double(),
                "ratio": m["ratio_sum"].double()}
        if entropy is not None:
            sums["entropy"] = entropy
        if "ref_logp" in batch:
            kl_tokens = kl_k3_tokens(logps, batch["ref_logp"]) if r.kl_type == "k3" else \
                kl_k1_tokens(logps, batch["ref_logp"])
            kl_sum = torch.where(mask, kl_tokens, zero).sum()
            sums["kl"] = kl_sum.detach()
            if r.kl_type == "k3":  # GRPO: the KL is a loss term; k1 went into the reward at the rollout
                loss_sum = loss_sum + r.kl_coef * kl_sum
        if self.critic is not None:  # PPO: the critic's forward, backward and step on the same micro-batch
            sums.update(self.critic.update(batch, mask, global_weight, boundary=batch.get("last_micro_batch", False)))
            # the logged loss is policy + vf_coef x value loss (TRL's total); the value part is detached
            # here: its gradient went to the critic's engine, the policy's backward sees only its own
            loss_sum = loss_sum + r.vf_coef * sums["value_loss"]
        return loss_sum / max(global_weight, 1), sums

    def evaluate(self, engine, eval_set: EvalSet, device: torch.device) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the reward functions: eval_reward (the
        weighted total) and eval_reward_<fn>, means over all eval prompts (all ranks)."""
        data, r = self.data, self.r
        ps = data.eval_prompts
        mine = eval_set.batches
        prompts = [ps.ids(i) for i in mine]
        if self.vllm is not None:
            outs = self.vllm.greedy(engine, self.stage, prompts, r.max_new_tokens, data.stop_ids)
        else:
            outs = self._greedy_hf(engine, prompts, device)
        texts = data.tok.batch_decode([c for c, _ in outs], skip_special_tokens=True)
        messages, columns, origins = ps.rows(mine)
        total, per_fn, missing = score(data.reward_fns, messages, texts, columns, origins,
                                       data.report_reward_failure) if mine else ([], {}, {})
        names = [f.name for f in data.reward_fns]
        local = torch.tensor([sum(total)] + [sum(per_fn.get(n, [])) for n in names] +
                             [sum(missing.get(n, [])) for n in names], dtype=torch.float64, device=device)
        totals = dist.all_reduce_sum(local).tolist()
        w, k = eval_set.global_weight, len(names)
        out = {"eval_reward": totals[0] / w}  # a missing value counts 0 here (no group to impute from)
        out.update({f"eval_reward_{n}": v / w for n, v in zip(names, totals[1: 1 + k])})
        out.update({f"eval_reward_{n}_missing": v / w for n, v in zip(names, totals[1 + k:])})
        return out

    def _greedy_hf(self, engine, prompts: list, device) -> list:
        """Greedy completions on the engine's model (the hf backend). Collective under ZeRO-3."""
        data, r, n_mine = self.data, self.r, len(prompts)
        with generation.generation_mode(engine, self.stage, r.zero3_gather) as synced:
            if synced:  # the hooks path: every rank runs as many generate calls (dummy prompts fill the gap)
                n = generation.batches_needed(len(prompts), r.generation_batch_size, device) * r.generation_batch_size
                prompts = prompts + [data.eval_prompts.ids(0)] * (n - len(prompts))
            return generation.generate(engine.module, prompts, keys=None, seed=0, temperature=1.0, top_p=1.0,
                                       max_new_tokens=r.max_new_tokens, stop_ids=data.stop_ids,
                                       pad_id=data.tok.pad_token_id, batch_size=r.generation_batch_size,
                                       synced_gpus=synced, device=device)[:n_mine]
