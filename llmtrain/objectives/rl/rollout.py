"""Rollout data for the one loop: a rollout every ppo_epochs x mini_batches optimizer steps, handed
out as one StepPlan per optimizer step.

Layout (why 2 ranks == 1 rank with accumulation): rollout k takes prompts at stream positions
[k*P, (k+1)*P) (P = rl.prompts_per_step; the stream is the prompt set, reshuffled per epoch with
seed (train.seed, epoch)); prompt i of the rollout is generated, with its G samples, on rank
i % world. Mini-batch m is the global prompt block [m*P/M, (m+1)*P/M), so on rank r it is the
rank's local prompts of that block: the same global mini-batch for any world size. Each rank's
share of a mini-batch, (P/(M*world)) * G sequences, is cut into train.grad_accum micro-batches of
train.micro_batch_size sequences.

PPO (rl.advantage=gae): per-token rewards (the sequence reward on the last completion token, minus
kl_coef x k1 per token with kl_type k1), the critic's values V_t at the positions that predict each
completion token (the log-probs' alignment), GAE with V = 0 after the last token, returns A + V, and
optionally A whitened with the moments of every rank's tokens (columns of the all-gather below).

Normalisation: each optimizer step's loss is the token-mean over its global mini-batch's
completion tokens. The counts come from one all-gather per rollout of a per-sequence table
(lengths, rewards), from which every rank derives every step's normaliser and the rollout metrics:
no collective per step.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ... import distributed as dist
from ...config import RLConfig, TrainConfig
from ...data.batching import StepPlan, collate_sequences
from ...data.labels import IGNORE_INDEX
from ...data.protocol import EvalSet
from ...errors import ConfigError
from ...losses.rl import gae, grpo_advantages, kl_k1_tokens, outcome_token_rewards, rloo_advantages, whiten
from . import generation
from .prompts import PromptSet
from .rewards import impute_group_means, score


def check_batch_shape(r: RLConfig, t: TrainConfig, world: int) -> int:
    """Sequences per rank per mini-batch; one error line naming the settings that must agree."""
    P, M, G = r.prompts_per_step, r.mini_batches, r.num_generations
    if P % (M * world):
        raise ConfigError(f"{r.where('rl.prompts_per_step')}: rl.prompts_per_step={P} must be a multiple of "
                          f"rl.mini_batches x world size = {M} x {world}")
    per_rank = P // (M * world) * G
    if t.micro_batch_size * t.grad_accum != per_rank:
        raise ConfigError(f"{t.where('train.grad_accum')}: each optimizer step trains {per_rank} sequences per rank "
                          f"(rl.prompts_per_step {P} x rl.num_generations {G} / (rl.mini_batches {M} x {world} ranks)); "
                          f"set train.micro_batch_size x train.grad_accum = {per_rank} "
                          f"(now {t.micro_batch_size} x {t.grad_accum})")
    return per_rank


MAX_REWARD_REPORTS = 5


def select_candidates(rewards: torch.Tensor) -> tuple[list[int], list[int]]:
    """DAPO's dynamic sampling, per slot: rewards (slots, O candidates, G samples) -> (the chosen candidate
    of each slot: the first whose samples' rewards differ, else the first; the number of such candidates
    per slot). A group whose samples all got one reward has zero advantage under GRPO/RLOO: no signal."""
    informative = (rewards.max(dim=2).values > rewards.min(dim=2).values)  # (slots, O)
    chosen = [int(row.nonzero()[0]) if bool(row.any()) else 0 for row in informative]
    return chosen, informative.sum(dim=1).tolist()


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequences (by index, in order) into rows of <= capacity tokens, next fit: a row takes the next
    sequence while it fits, else a new row starts (a sequence longer than capacity gets a row alone).
    Order-preserving so a micro-batch's layout depends only on its own sequences."""
    rows: list[list[int]] = []
    used = 0
    for j, n in enumerate(lengths):
        if rows and used + n <= capacity:
            rows[-1].append(j)
            used += n
        else:
            rows.append([j])
            used = n
    return rows


class RolloutData:
    """TrainData of `llmtrain rl` (data/protocol.py). attach() gives it the engine before the first step."""

    prefetch_safe = False  # next_step generates with the engine: the loop must not plan in a thread

    def __init__(self, r: RLConfig, t: TrainConfig, prompts: PromptSet, eval_prompts: Optional[PromptSet],
                 tokenizer, info, reward_fns, stop_ids: list[int], pack_len: Optional[int] = None):
        self.r, self.t, self.prompts, self.eval_prompts = r, t, prompts, eval_prompts
        self.pack_len = pack_len  # data.packing: a micro-batch's sequences share rows of <= pack_len tokens
        self.tok, self.info, self.reward_fns, self.stop_ids = tokenizer, info, reward_fns, stop_ids
        self.per_rank = check_batch_shape(r, t, info.world_size)
        self.steps_per_rollout = r.ppo_epochs * r.mini_batches
        self.rollouts_done, self.step_in_rollout = 0, 0
        self.buffer: Optional[list[dict]] = None  # this rank's sequences of the current rollout
        self.engine = self.stage = self.ref_logps = self.critic_values = None
        self.need_old = self.steps_per_rollout > 1  # one step per rollout: old log-probs = the live ones, detached
        self._last_rollout_end: Optional[float] = None
        self.vllm = None  # rl.generation_backend=vllm: the VLLMBackend (objectives/rl/vllm_backend.py)
        self.reward_failures = 0  # completions of this rank a reward function gave no value (rewards.score)
        self._order: tuple = (None, None)  # (epoch, its permutation of the prompts): _prompt_at

    def report_reward_failure(self, line: str) -> None:
        """A reward function gave no value for a completion: counted; the first few lines of each rank are
        printed (the rollouts' reward_<fn>_missing metric carries the rest)."""
        self.reward_failures += 1
        if self.reward_failures <= MAX_REWARD_REPORTS:
            more = "; further ones only counted (reward_<fn>_missing)" if self.reward_failures == MAX_REWARD_REPORTS else ""
            dist.warn(f"rl: no reward for a completion of {line}{more}")

    def attach(self, engine, stage: int, policy_logps, ref_logps, critic_values=None) -> None:
        """engine: the policy's DeepSpeed engine; policy_logps / ref_logps(batch) -> (B, T) target
        log-probs of the policy / the reference model (ref None: no reference); critic_values(batch) ->
        (B, T) values at every position (PPO; None otherwise)."""
        self.engine, self.stage, self.policy_logps, self.ref_logps = engine, stage, policy_logps, ref_logps
        self.critic_values = critic_values

    # --- the prompt stream ---
    def _prompt_at(self, pos: int) -> int:
        """The prompt at stream position pos: epoch e = pos // n is a permutation seeded by (train.seed, e),
        made once per epoch (not per prompt: O(n) each at 10^6 prompts would cost seconds per rollout)."""
        n = len(self.prompts)
        epoch = pos // n
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.t.seed, epoch]).permutation(n))
        return int(self._order[1][pos % n])

    # --- TrainData ---
    def next_step(self) -> StepPlan:
        metrics = {}
        if self.buffer is None or self.step_in_rollout == self.steps_per_rollout:
            if self.buffer is None and self.step_in_rollout not in (0, self.steps_per_rollout):
                dist.warn(f"resumed inside rollout {self.rollouts_done} (step {self.step_in_rollout} of "
                          f"{self.steps_per_rollout}) without its saved samples (another world size): its rest is "
                          "regenerated from the current weights (not exact)")
                self.rollouts_done -= 1
            else:
                self.step_in_rollout = 0
            metrics = self._rollout()
            self.rollouts_done += 1
        m = self.step_in_rollout % self.r.mini_batches
        self.step_in_rollout += 1
        block = range(m * self.per_rank, (m + 1) * self.per_rank)
        mbs = self.t.micro_batch_size
        micro = [list(block[a: a + mbs]) for a in range(0, self.per_rank, mbs)]
        return StepPlan(micro_batches=micro, global_weight=int(self.completion_tokens[:, block].sum()),
                        global_tokens=int(self.all_tokens[:, block].sum()),
                        epoch=self.rollouts_done * self.r.prompts_per_step * self.r.oversample / len(self.prompts),
                        metrics=metrics)

    def batches(self, plan: StepPlan) -> list[dict]:
        out = [self.collate([self.buffer[i] for i in mb]) for mb in plan.micro_batches]
        for i, b in enumerate(out):  # PPO's critic steps its own engine at the policy's accumulation boundary
            b["last_micro_batch"] = i == len(out) - 1
        return out

    def eval_set(self) -> Optional[EvalSet]:
        if self.eval_prompts is None:
            return None
        mine = list(range(self.info.rank, len(self.eval_prompts), self.info.world_size))
        return EvalSet(batches=mine, global_weight=len(self.eval_prompts))

    def state_dict(self) -> dict:
        return {"fingerprint": self.prompts.fingerprint, "rollouts_done": self.rollouts_done,
                "step_in_rollout": self.step_in_rollout, "prompts_per_step": self.r.prompts_per_step}

    def rank_state(self) -> Optional[dict]:
        """This rank's share of the current rollout, which each checkpoint keeps per rank
        (checkpoints/step_N/data/rank_<r>.pt): a resume inside a rollout continues it exactly instead of
        regenerating it from later weights. Lists become tensors (float64 / int64: exact, and far smaller
        on disk than pickled Python numbers)."""
        if self.buffer is None or self.step_in_rollout == self.steps_per_rollout:  # the next step generates anew
            return None
        seqs = [{k: _as_tensor(v) for k, v in s.items()} for s in self.buffer]
        return {"rollout": self.rollouts_done, "world_size": self.info.world_size, "seqs": seqs,
                "completion_tokens": torch.from_numpy(self.completion_tokens),
                "all_tokens": torch.from_numpy(self.all_tokens)}

    def load_rank_state(self, state: Optional[dict]) -> None:
        """After load_state_dict: the saved rollout, when it is the one the position is inside and the world
        size is the same (else next_step regenerates it, with a warning)."""
        if not state or state["rollout"] != self.rollouts_done or state["world_size"] != self.info.world_size:
            return
        self.buffer = [{k: v.tolist() if torch.is_tensor(v) else v for k, v in s.items()} for s in state["seqs"]]
        self.completion_tokens = state["completion_tokens"].numpy()
        self.all_tokens = state["all_tokens"].numpy()

    def load_state_dict(self, state: dict) -> None:
        if state.get("prompts_per_step", self.r.prompts_per_step) != self.r.prompts_per_step:
            dist.print0(f"resume: rl.prompts_per_step {state['prompts_per_step']} -> {self.r.prompts_per_step}: "
                        f"the prompt stream continues at position {int(state['rollouts_done'])} x {self.r.prompts_per_step}")
        self.rollouts_done = int(state["rollouts_done"])
        self.step_in_rollout = int(state["step_in_rollout"])
        self.buffer = None

    # --- collation ---
    def collate(self, seqs: list[dict]) -> dict:
        """The sequences (prompt + completion, labels on the completion) one per row, or with data.packing
        several per row (pack_rows; position ids restart per sequence, flash gets the boundaries), plus the
        per-token rollout tensors aligned with the shifted targets (position t predicts token t + 1).
        batch["seq_loc"][j] = (row, offset) of seqs[j]."""
        samples = []
        for s in seqs:
            ids = np.asarray(s["prompt"] + s["completion"], dtype=np.int64)
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
            labels[len(s["prompt"]):] = s["completion"]
            samples.append((ids, labels))
        layout = pack_rows([len(i) for i, _ in samples], self.pack_len) if self.pack_len else \
            [[j] for j in range(len(samples))]
        batch = collate_sequences([[samples[j] for j in row] for row in layout], self.tok.pad_token_id)
        loc = [(0, 0)] * len(seqs)
        for b, row in enumerate(layout):
            offset = 0
            for j in row:
                loc[j] = (b, offset)
                offset += len(samples[j][0])
        batch["seq_loc"] = loc
        B, T = batch["input_ids"].shape
        adv = torch.zeros((B, T), dtype=torch.float32)
        old = torch.zeros((B, T), dtype=torch.float32)
        ref = torch.zeros((B, T), dtype=torch.float32)
        ppo = self.critic_values is not None
        returns, values = (torch.zeros((B, T), dtype=torch.float32) for _ in range(2))
        for (b, o), s in zip(loc, seqs):
            a, n = o + len(s["prompt"]) - 1, len(s["completion"])  # target position of the first completion token
            adv[b, a: a + n] = torch.as_tensor(s["adv"], dtype=torch.float32)  # per sequence, or per token (PPO)
            if s.get("old") is not None:
                old[b, a: a + n] = torch.tensor(s["old"])
            if s.get("ref") is not None:
                ref[b, a: a + n] = torch.tensor(s["ref"])
            if ppo and s.get("ret") is not None:
                returns[b, a: a + n] = torch.tensor(s["ret"])
                values[b, a: a + n] = torch.tensor(s["val"])
        batch["adv"] = adv
        if ppo:
            batch["returns"], batch["old_values"] = returns, values
        if self.need_old:
            batch["old_logp"] = old
        if self.ref_logps is not None:
            batch["ref_logp"] = ref
        return batch

    # --- the rollout ---
    def _rollout(self) -> dict:
        """Generate, score, old/ref log-probs, advantages, one all-gather; fills self.buffer. Collective."""
        r, info, k = self.r, self.info, self.rollouts_done
        t0 = time.perf_counter()
        train_sec = t0 - self._last_rollout_end if self._last_rollout_end is not None else None
        P, G, O = r.prompts_per_step, r.num_generations, r.oversample
        first = k * P * O
        local = list(range(info.rank, P, info.world_size))  # rollout slots (prompt indices) of this rank
        # candidate j of slot i is stream position first + j * P + i: which candidates a slot has, and their
        # samples (keyed by position), do not depend on the world size
        cands = [first + j * P + i for i in local for j in range(O)]
        pids = [self._prompt_at(c) for c in cands]
        prompt_ids = [ids for ids in map(self.prompts.ids, pids) for _ in range(G)]
        keys = [(k, c, g) for c in cands for g in range(G)]
        completions = self._generate(prompt_ids, keys)
        gen_sec = time.perf_counter() - t0
        texts = self.tok.batch_decode([c for c, _ in completions], skip_special_tokens=True)
        rep = [p for p in pids for _ in range(G)]  # prompt of each sequence
        messages, columns, origins = self.prompts.rows(rep)
        total, per_fn, missing = score(self.reward_fns, messages, texts, columns, origins, self.report_reward_failure)
        if any(any(flags) for flags in missing.values()):  # neither rewarded nor punished against its group
            total = impute_group_means(per_fn, missing, {f.name: f.weight for f in self.reward_fns}, G)
        gen_tokens = [sum(len(completions[(a * O + j) * G + g][0]) for j in range(O) for g in range(G))
                      for a in range(len(local))]  # per slot, every candidate's
        chosen, informative = select_candidates(torch.tensor(total, dtype=torch.float64).view(len(local), O, G))
        keep = [(a * O + j) * G + g for a, j in enumerate(chosen) for g in range(G)]  # slot order, as without O
        prompt_ids, completions, total = ([x[i] for i in keep] for x in (prompt_ids, completions, total))
        per_fn = {n: [v[i] for i in keep] for n, v in per_fn.items()}
        missing = {n: [v[i] for i in keep] for n, v in missing.items()}
        self.buffer = [{"prompt": pi, "completion": c, "truncated": tr, "adv": 0.0}
                       for pi, (c, tr) in zip(prompt_ids, completions)]
        slot_cols = [torch.tensor([per_slot[a] / d for a in range(len(local)) for _ in range(G)], dtype=torch.float64)
                     for per_slot, d in ((gen_tokens, G), (informative, O))]  # sums / means over sequences = per slot
        kl_seq = self._logps_for_buffer()
        rewards = torch.tensor(total, dtype=torch.float64)
        extra = {}
        if r.advantage == "gae":  # the k1 penalty goes in per token
            extra = self._gae_advantages(rewards)
        else:
            if kl_seq is not None:  # k1 penalty in the reward (RLOO style): r - beta * sum_t k1_t
                rewards = rewards - r.kl_coef * kl_seq
            groups = rewards.view(-1, r.num_generations)  # (local prompts, G)
            adv = rloo_advantages(groups) if r.advantage == "rloo" else \
                grpo_advantages(groups, scale_std=r.scale_std, eps=r.std_eps)
            for s, a in zip(self.buffer, adv.flatten().tolist()):
                s["adv"] = a
        metrics = self._gather_table(rewards, torch.tensor(total, dtype=torch.float64), per_fn, kl_seq, extra, missing,
                                     slot_cols)
        if extra:
            metrics.update(self._finish_gae(metrics.pop("_extra")))
        metrics.pop("_extra", None)
        metrics.update(gen_sec=gen_sec, rollout_sec=time.perf_counter() - t0)
        metrics["gen_tokens_per_sec"] = metrics.pop("_completion_tokens") / max(gen_sec, 1e-9)
        if train_sec is not None:  # the optimizer steps (and any eval/checkpoint) since the last rollout
            metrics["train_sec_prev"] = train_sec
        self._last_rollout_end = time.perf_counter()
        return metrics

    def _generate(self, prompt_ids: list, keys: list) -> list:
        r = self.r
        if self.vllm is not None:  # syncs the weights first when an update came since the last generate
            return self.vllm.rollout(self.engine, self.stage, prompt_ids, keys, self.stop_ids)
        with generation.generation_mode(self.engine, self.stage, r.zero3_gather) as synced:
            return generation.generate(self.engine.module, prompt_ids, keys=keys, seed=self.t.seed,
                                       temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                       stop_ids=self.stop_ids, pad_id=self.tok.pad_token_id,
                                       batch_size=r.generation_batch_size, synced_gpus=synced, device=self.info.device)

    @torch.no_grad()
    def _logps_for_buffer(self) -> Optional[torch.Tensor]:
        """Old (ppo_epochs x mini_batches > 1) and reference log-probs of every buffered sequence, one
        no-grad forward each per rollout; returns the per-sequence k1 sum for the reward penalty, or None."""
        need_ref, need_val = self.ref_logps is not None, self.critic_values is not None
        if not (self.need_old or need_ref or need_val):
            return None
        want_k1 = need_ref and self.r.kl_type == "k1"
        mbs = self.t.micro_batch_size
        k1 = []
        for a in range(0, len(self.buffer), mbs):
            seqs = self.buffer[a: a + mbs]
            batch = {k: v.to(self.info.device) if torch.is_tensor(v) else v for k, v in self.collate(seqs).items()}
            pol = self.policy_logps(batch) if (self.need_old or want_k1) else None
            ref = self.ref_logps(batch) if need_ref else None
            val = self.critic_values(batch) if need_val else None  # (B, T): V at every position (PPO)
            for (b, o), s in zip(batch["seq_loc"], seqs):
                i, n = o + len(s["prompt"]) - 1, len(s["completion"])
                if pol is not None and self.need_old:
                    s["old"] = pol[b, i: i + n].float().cpu().tolist()
                if ref is not None:
                    s["ref"] = ref[b, i: i + n].float().cpu().tolist()
                if val is not None:
                    s["val"] = val[b, i: i + n].float().cpu().tolist()
                if want_k1:
                    k1_tokens = kl_k1_tokens(pol[b, i: i + n], ref[b, i: i + n]).float()
                    k1.append(float(k1_tokens.sum()))
                    if need_val:  # PPO: the penalty goes into the reward per token
                        s["k1"] = k1_tokens.cpu().tolist()
        return torch.tensor(k1, dtype=torch.float64) if want_k1 else None

    def _gather_table(self, rewards, raw_total, per_fn: dict, kl_seq, extra: dict, missing: dict,
                      slot_cols: list) -> dict:
        """One all-gather of (completion length, prompt length, truncated, reward, raw reward, per-function
        rewards, per-function missing flags, generated tokens of the slot's candidates / G, informative
        candidates of the slot / O[, k1 sum][, extra columns]) per sequence; sets the per-step token counts
        and returns the rollout's global metrics, with the gathered extra columns under "_extra"
        ({name: (all seqs,)})."""
        names = sorted(per_fn)
        cols = [torch.tensor([len(s["completion"]) for s in self.buffer], dtype=torch.float64),
                torch.tensor([len(s["prompt"]) for s in self.buffer], dtype=torch.float64),
                torch.tensor([float(s["truncated"]) for s in self.buffer], dtype=torch.float64),
                rewards, raw_total] + [torch.tensor(per_fn[n], dtype=torch.float64) for n in names]
        cols += [torch.tensor(missing[n], dtype=torch.float64) for n in names] + list(slot_cols)
        if kl_seq is not None:
            cols.append(kl_seq)
        first_extra = len(cols)
        cols += [extra[k] for k in sorted(extra)]
        table = torch.stack(cols, 1)  # (local seqs, C)
        table = _all_gather(table, self.info.device)  # (world, local seqs, C)
        self.completion_tokens = table[:, :, 0].long().numpy()
        self.all_tokens = (table[:, :, 0] + table[:, :, 1]).long().numpy()
        flat = table.reshape(-1, table.shape[-1])
        G = self.r.num_generations
        group_std = flat[:, 4].view(-1, G).std(dim=1, unbiased=False)
        out = {"reward": float(flat[:, 4].mean()), "reward_std": float(flat[:, 4].std(unbiased=False)),
               "completion_len": float(flat[:, 0].mean()), "truncated_frac": float(flat[:, 2].mean()),
               "rollout": self.rollouts_done + 1, "_completion_tokens": float(flat[:, 5 + 2 * len(names)].sum())}
        if self.r.oversample > 1:  # share of all candidate groups (before the choice) whose samples' rewards differ
            out["oversample_informative"] = float(flat[:, 6 + 2 * len(names)].mean())
        if G > 1:  # one sample per prompt (PPO may use it) has no group to compare
            out["zero_var_groups"] = float((group_std == 0).double().mean())
        for j, n in enumerate(names):
            out[f"reward_{n}"] = float(flat[:, 5 + j].mean())
            out[f"reward_{n}_missing"] = float(flat[:, 5 + len(names) + j].mean())  # share without a value
            if out[f"reward_{n}_missing"] == 1.0:  # decided on the gathered table: every rank raises alike
                raise ConfigError(f"rl.reward_fns: {n} gave no value for any of the rollout's {flat.shape[0]} "
                                  "completions (the warnings above say why); fix the function (one float, or "
                                  "None, per completion)")
        if kl_seq is not None:
            out["kl_k1_seq"] = float(flat[:, first_extra - 1].mean())
        out["_extra"] = {k: flat[:, first_extra + j] for j, k in enumerate(sorted(extra))}
        return out

    # --- PPO: GAE on the critic's values ---
    def _gae_advantages(self, scores: torch.Tensor) -> dict:
        """Per-token rewards, GAE advantages and returns of every buffered sequence (into the buffer);
        returns per-sequence moment columns for the all-gather (whitening, explained variance)."""
        r, seqs = self.r, self.buffer
        lens = [len(s["completion"]) for s in seqs]
        N, C = len(seqs), max(lens)
        mask = torch.zeros((N, C), dtype=torch.bool)
        values, k1 = torch.zeros((N, C)), torch.zeros((N, C))
        for j, s in enumerate(seqs):
            mask[j, : lens[j]] = True
            values[j, : lens[j]] = torch.tensor(s["val"])
            if "k1" in s:
                k1[j, : lens[j]] = torch.tensor(s["k1"])
        coef = r.kl_coef if (r.kl_type == "k1" and self.ref_logps is not None) else 0.0  # k3: a loss term instead
        token_rewards = outcome_token_rewards(scores, mask, k1 if coef else None, coef)  # (N, C)
        adv, ret = gae(token_rewards, values, mask, r.gamma, r.lam)  # (N, C) each, 0 past each sequence's end
        for j, s in enumerate(seqs):
            s["adv"], s["ret"] = adv[j, : lens[j]].tolist(), ret[j, : lens[j]].tolist()
        adv, ret, res = adv.double(), ret.double(), (ret - values * mask).double()  # res: the critic's residual
        return {"adv_sum": adv.sum(1), "adv_sq": (adv ** 2).sum(1), "ret_sum": ret.sum(1), "ret_sq": (ret ** 2).sum(1),
                "res_sum": res.sum(1), "res_sq": (res ** 2).sum(1), "val_sum": (values.double() * mask).sum(1)}

    def _finish_gae(self, cols: dict) -> dict:
        """After the all-gather: whiten this rank's advantages with the global moments; the rollout's
        critic metrics (explained variance 1 - Var(R - V) / Var(R) of the rollout's values)."""
        count = float(self.completion_tokens.sum())
        if self.r.whiten_advantages:
            s1, s2 = float(cols["adv_sum"].sum()), float(cols["adv_sq"].sum())
            for s in self.buffer:
                s["adv"] = whiten(torch.tensor(s["adv"]), 1.0, s1, s2, count).tolist()

        def var(a, b):
            mean = float(cols[a].sum()) / count
            return float(cols[b].sum()) / count - mean * mean

        out = {"rollout_value": float(cols["val_sum"].sum()) / count, "rollout_return": float(cols["ret_sum"].sum()) / count}
        var_ret = var("ret_sum", "ret_sq")
        if var_ret > 0:  # all returns equal: no variance to explain (left out rather than a NaN in metrics.jsonl)
            out["explained_var"] = 1.0 - var("res_sum", "res_sq") / var_ret
        return out


def _as_tensor(v):
    """A list of ints or floats as an int64 / float64 tensor (exact round trip through .tolist()); else v."""
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return torch.tensor(v, dtype=torch.int64 if all(isinstance(x, int) for x in v) else torch.float64)
    return v


def _all_gather(t: torch.Tensor, device) -> torch.Tensor:
    """(n, C) on every rank -> (world, n, C) on the host; n is the same on every rank (check_batch_shape)."""
    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return t.unsqueeze(0)
    x = t.to(device)
    parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, x)
    return torch.stack(parts).cpu()
