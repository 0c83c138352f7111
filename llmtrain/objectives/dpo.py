"""Tasks differ only in their data and their loss; everything else is the shared loop.

A task gives the loop:
  build_data(cfg, tokenizer, info) -> TrainData   what to train and evaluate on
  loss(engine, batch, global_weight) -> (loss, sums)
      `loss` is this micro-batch's share of the step loss (already divided by the step's
      global normaliser); `sums` are detached per-micro-batch sums the loop all-reduces and
      divides by the global normaliser on log steps (e.g. DPO's correctly ranked pairs).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import dist
from .config import Config, sources
from .data.batching import BatchPlanner, RowStream, StepPlan, collate_sequences, eval_micro_batches
from .data.chat import IGNORE_INDEX, chat_options
from .losses import (causal_lm_loss, packed_sequence_logps, shift_labels, token_logps_and_sum_ce,
                     token_logps_from_logits)


@dataclass
class EvalSet:
    batches: object  # this rank's collated micro-batches: a list, or an iterable with len() collating lazily
    global_weight: int  # normaliser over the whole eval set (all ranks)


class LazyBatches:
    """This rank's eval micro-batches, collated when iterated: the eval set is never held as tensors."""

    def __init__(self, collate, samples, micro_batches: list):
        self.collate, self.samples, self.micro_batches = collate, samples, micro_batches

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __iter__(self):
        for rows in self.micro_batches:
            yield self.collate(self.samples, rows)


class SequenceData:
    """Tokenized sequences (prepared on disk, read by position): shuffled/packed rows, planned per step (SFT, DPO).
    `train`/`eval_set` are samples.SampleStore (or a view of one, or an in-memory SampleSet)."""

    def __init__(self, cfg: Config, info, train, eval_set, pad_id: int, unit_weights):
        t, d = cfg.train, cfg.data
        self.samples, self.pad_id = train, pad_id
        self.stream = RowStream(train.unit_lengths(), seed=t.seed, packing=d.packing, max_len=self._row_len(cfg))
        self.planner = BatchPlanner(self.stream, unit_weights(train), micro_batch_size=t.micro_batch_size,
                                    grad_accum=t.grad_accum, world_size=info.world_size, rank=info.rank)
        self.eval_samples, self.eval_weights = eval_set, (unit_weights(eval_set) if eval_set is not None else None)
        self.cfg, self.info = cfg, info
        self.attach_unit_ids = False

    def _row_len(self, cfg: Config) -> int:
        return cfg.data.max_seq_len * self.samples.seqs_per_unit  # a packed row holds at least one whole unit

    def collate(self, samples, rows: list) -> dict:
        """Packed: a row holds every sequence of its units. Unpacked: one sequence per row (a DPO
        pair becomes two rows, chosen then rejected, so sequence order is the same either way)."""
        if self.cfg.data.packing:
            seq_rows = [[s for u in row for s in samples.unit(u)] for row in rows]
        else:
            seq_rows = [[s] for row in rows for u in row for s in samples.unit(u)]
        batch = collate_sequences(seq_rows, self.pad_id)
        if self.attach_unit_ids:  # DPO's precomputed reference log-probs are looked up by unit id
            offset = 0 if samples is self.samples else len(self.samples)  # eval units follow train units
            batch["unit_ids"] = torch.tensor([offset + u for row in rows for u in row], dtype=torch.long)
        return batch

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
        batches = LazyBatches(self.collate, self.eval_samples, mbs)
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


def encode_spec(cfg: Config, kind: str):
    """How this run turns rows into sequences (part of the prepared data's cache key)."""
    from .data.prepare_samples import EncodeSpec

    d = cfg.data
    return EncodeSpec(kind=kind, max_seq_len=d.max_seq_len, truncation=d.truncation, max_prompt_len=d.max_prompt_len,
                      options=(("chat", chat_options(d)),))  # data.train_reasoning / template_date


def prepare_request(cfg: Config, tok_hash: str, key: str, kind: str, info=None):
    from .data.prepare_samples import Request

    d = cfg.data
    return Request(key=key, srcs=sources(cfg, key), spec=encode_spec(cfg, kind), tok_hash=tok_hash,
                   cache_root=d.cache_dir or os.path.join(cfg.output_dir, "cache"), chunk_rows=d.prepare_chunk_rows,
                   workers=d.prepare_workers, timeout_s=d.prepare_timeout_minutes * 60,
                   max_bad_fraction=d.max_bad_fraction, rank=getattr(info, "rank", 0),
                   world_size=getattr(info, "world_size", 1), local_world_size=getattr(info, "local_world_size", 1))


def load_split(cfg: Config, tokenizer, tok_hash: str, key: str, kind: str, info=None):
    """A split's samples, prepared once by all ranks together (llmtrain.data.prepare_samples) into
    the content-keyed cache and memory-mapped; the bad-row report goes to output_dir on rank 0."""
    from .data.prepare_samples import TooManyBadRows, prepared_split
    from .data.sources import DataError

    d = cfg.data
    report_path = os.path.join(cfg.output_dir, f"bad_rows_{key.split('.')[-1]}.jsonl")
    try:
        samples, report = prepared_split(prepare_request(cfg, tok_hash, key, kind, info), tokenizer)
    except TooManyBadRows as e:
        if dist.is_main():
            os.makedirs(cfg.output_dir, exist_ok=True)
            e.report.write(report_path)
        seen = "" if e.complete else " (preparation stopped early: these rows alone exceed the budget of the split)"
        raise DataError(f"{key} (all bad rows listed in {report_path}): {e.report.summary()} — above "
                        f"data.max_bad_fraction={d.max_bad_fraction}{seen}; fix the rows or raise data.max_bad_fraction") from None
    if report.bad and dist.is_main():
        report.write(report_path)
        print(f"{key}: {report.summary()} (all listed in {report_path})", flush=True)
    if report.dropped_too_long:
        dist.print0(f"{key}: dropped {report.dropped_too_long} samples longer than data.max_seq_len={d.max_seq_len} (data.truncation=drop)")
    if len(samples) == 0:
        raise DataError(f"{key}: no usable sample in {', '.join(s.path for s in sources(cfg, key))}")
    return samples


# --------------------------------------------------------------------------- SFT


# config attributes of models that post-process the LM head's output (softcapping, scaling):
# the chunked head returns log-probs in its place, which that post-processing would corrupt
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


@contextlib.contextmanager
def _chunked_lm_head(engine, targets: torch.Tensor, chunk_tokens: int):
    """While active, the model's LM head returns per-token label log-probs (B, T) instead of
    logits (B, T, V), computed `chunk_tokens` tokens at a time (losses.token_logps_and_sum_ce).

    Only the head module's `forward` is swapped; the module is still *called* by the model
    inside the DeepSpeed engine's forward, so ZeRO-3's module hooks gather its (possibly tied)
    weight before our forward and again before our backward, exactly as for an nn.Linear.
    """
    model = engine.module
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    bad = [a for a in _LOGIT_POSTPROCESSING if getattr(config, a, None) not in (None, 1, 1.0)]
    if head is None or not hasattr(head, "weight") or bad:
        from .config import ConfigError

        why = f"its config sets {', '.join(bad)} (post-processed logits)" if bad else "it has no linear LM head"
        raise ConfigError(f"train.loss_chunk_tokens={chunk_tokens} is not supported for this model: {why}; "
                          "set train.loss_chunk_tokens=0")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # hidden (B, T, H) in the head's dtype -> label log-probs (B, T) fp32, 0 where ignored
        token_logps, _ = token_logps_and_sum_ce(hidden, head.weight, targets, chunk_tokens,
                                                lm_head_bias=getattr(head, "bias", None))
        return token_logps

    head.forward = forward  # an instance attribute shadows the class method
    try:
        yield
    finally:
        del head.forward


def lm_forward_logps(engine, batch: dict, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the packed/padded batch; per-token log-probs of the next token (B, T) and shifted labels.

    chunk_tokens > 0 (train.loss_chunk_tokens): the LM head and log-softmax run over that many
    tokens at a time and the (B, T, V) fp32 logits are never materialised (same values and
    gradients to float tolerance; backward recomputes each chunk's logits).
    """
    targets = shift_labels(batch["labels"])  # (B, T): targets[:, t] = labels[:, t + 1]
    inputs = model_inputs(engine, batch)
    if chunk_tokens <= 0:
        out = engine(**inputs)
        return token_logps_from_logits(out.logits, targets), targets
    with _chunked_lm_head(engine, targets, chunk_tokens):
        out = engine(**inputs)
    return out.logits, targets  # the head returned (B, T) log-probs in place of logits


def model_inputs(engine, batch: dict) -> dict:
    """The model's keyword arguments for a collated batch (`collate_sequences`).

    sdpa/eager/flex: input_ids and position_ids; transformers builds the block-diagonal mask of
    packed rows from the position_ids. flash-attn (flash_attention_2/3, hub flash kernels): the
    sample boundaries too, as varlen kwargs over the micro-batch flattened to one row; without
    them transformers infers boundaries only when B == 1 and otherwise lets packed samples attend
    to each other.

    Syncs: at B == 1 the position-id scan used to cost four host-device syncs in every layer
    (`_is_packed_sequence`'s bool, the nonzero in `prepare_fa_kwargs_from_position_ids`, and the
    kernel reading its two 0-d max-length tensors as ints); precomputed on the host, with
    max_segment_len a Python int, the layers sync not at all. One sync per forward remains in
    transformers' mask preparation (`find_packed_sequence_indices`), as on sdpa
    (bench/flash_syncs.py counts them).
    """
    from transformers.utils.generic import is_flash_attention_requested

    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    config = getattr(getattr(engine, "module", engine), "config", None)  # a DeepSpeed engine, or a bare model
    if config is not None and is_flash_attention_requested(config):
        cu, longest = batch["cu_seq_lens"], batch["max_segment_len"]
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return inputs


class SFTTask:
    name = "sft"
    chunk_tokens = 0  # train.loss_chunk_tokens, set by build_data

    def build_data(self, cfg: Config, tokenizer, info, tok_hash: str) -> SequenceData:
        from .data.sft import split_eval

        self.chunk_tokens = cfg.train.loss_chunk_tokens
        train = load_split(cfg, tokenizer, tok_hash, "data.train", "sft", info)
        eval_set = load_split(cfg, tokenizer, tok_hash, "data.eval", "sft", info) if cfg.data.eval else None
        if eval_set is None and cfg.data.eval_fraction > 0:
            train, eval_set = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
        return SequenceData(cfg, info, train, eval_set, tokenizer.pad_token_id, unit_weights=lambda s: s.seq_targets())

    def loss(self, engine, batch: dict, global_weight: int):
        token_logps, targets = lm_forward_logps(engine, batch, self.chunk_tokens)
        loss, metrics = causal_lm_loss(token_logps, targets, global_weight)
        return loss, {}


# --------------------------------------------------------------------------- DPO


def pair_logps(engine, batch: dict, chunk_tokens: int = 0, with_lengths: bool = False):
    """One forward over chosen and rejected together -> summed response log-probs, each (pairs,);
    with_lengths also returns the responses' target-token counts, (pairs, 2): chosen, rejected."""
    token_logps, targets = lm_forward_logps(engine, batch, chunk_tokens)
    seq_ids = shift_labels(batch["seq_index"])  # (B, T): sequence of the token each position predicts
    seq_ids = torch.where(targets == IGNORE_INDEX, torch.full_like(seq_ids, -1), seq_ids)
    logps = packed_sequence_logps(token_logps, targets, seq_ids, batch["num_seqs"])  # (2P,)
    pairs = logps.view(-1, 2)  # (2P,) -> (P, 2): sequences alternate chosen, rejected
    if not with_lengths:
        return pairs[:, 0], pairs[:, 1]
    ones = torch.ones_like(token_logps)
    lengths = packed_sequence_logps(ones, targets, seq_ids, batch["num_seqs"]).view(-1, 2)  # (P, 2) token counts
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


class DPOTask:
    """DPO family on preference pairs. The reference model is, in order of preference:
    the policy with its LoRA adapters disabled (no second copy), log-probs precomputed once
    before training (dpo.precompute_ref), or a frozen copy sharded like the policy."""

    name = "dpo"

    def __init__(self):
        self.ref_engine = None  # frozen copy (full fine-tuning without precompute)
        self.ref_table = None  # (pairs, 2) float64 reference log-probs, indexed by unit id
        self.cfg = None

    def build_data(self, cfg: Config, tokenizer, info, tok_hash: str) -> SequenceData:
        from .config import ConfigError
        from .data.sft import split_eval

        if cfg.data.max_prompt_len >= cfg.data.max_seq_len:
            raise ConfigError(f"{cfg.where('data.max_prompt_len')}: data.max_prompt_len={cfg.data.max_prompt_len} must be "
                              f"below data.max_seq_len={cfg.data.max_seq_len} to leave the response a budget")
        self.cfg = cfg
        train = load_split(cfg, tokenizer, tok_hash, "data.train", "dpo", info)
        eval_set = load_split(cfg, tokenizer, tok_hash, "data.eval", "dpo", info) if cfg.data.eval else None
        if eval_set is None and cfg.data.eval_fraction > 0:
            train, eval_set = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
        data = SequenceData(cfg, info, train, eval_set, tokenizer.pad_token_id,
                            unit_weights=lambda s: np.ones(len(s), dtype=np.int64))
        data.attach_unit_ids = True
        return data

    def prepare(self, run) -> None:
        """Set up the reference before any training step (and before a resume loads weights)."""
        from . import reference

        cfg = run.cfg
        if cfg.dpo.disable_dropout:
            switched = disable_dropout(run.engine.module)
            if switched:
                dist.print0(f"dpo: dropout off in the policy ({switched} dropout settings; dpo.disable_dropout=false keeps them)")
        lora = reference.has_adapters(run.engine)
        dist.print0(f"dpo: reference = {'adapters_disabled' if lora else 'precomputed' if cfg.dpo.precompute_ref else 'frozen_copy'}")
        if lora:
            return
        if cfg.dpo.precompute_ref:
            self.ref_table = reference.precompute(run, self._policy_logps_for_ref)
        else:
            self.ref_engine = reference.frozen_copy(run)

    def _policy_logps_for_ref(self, engine, batch):
        return pair_logps(engine, batch, self.cfg.train.loss_chunk_tokens)

    def _ref_logps(self, engine, batch):
        from . import reference

        if self.ref_table is not None:
            units = batch["unit_ids"]
            return self.ref_table[units, 0], self.ref_table[units, 1]
        with torch.no_grad():
            if self.ref_engine is not None:
                return pair_logps(self.ref_engine, batch, self.cfg.train.loss_chunk_tokens)
            with reference.adapters_disabled(engine):
                return pair_logps(engine, batch, self.cfg.train.loss_chunk_tokens)

    def loss(self, engine, batch: dict, global_weight: int):
        from .losses import DPO_LOSSES, chosen_nll_loss

        d = self.cfg.dpo
        ref_c, ref_r = self._ref_logps(engine, batch)
        pol_c, pol_r, lengths = pair_logps(engine, batch, self.cfg.train.loss_chunk_tokens, with_lengths=True)
        ref_c, ref_r = ref_c.to(pol_c.dtype), ref_r.to(pol_r.dtype)
        nll_sum = chosen_nll_loss(pol_c, lengths[:, 0], reduction="sum")
        if d.loss == "ipo":
            # IPO on per-token averaged log-probs, as TRL does: with summed ones h grows with the
            # response length and the fixed target margin 1 / (2 beta) means different things per pair
            n_c, n_r = lengths[:, 0].clamp(min=1), lengths[:, 1].clamp(min=1)
            pol_c, pol_r, ref_c, ref_r = pol_c / n_c, pol_r / n_r, ref_c / n_c, ref_r / n_r
        kwargs = {"label_smoothing": d.label_smoothing} if d.loss == "sigmoid" else {}
        loss_sum, means = DPO_LOSSES[d.loss](pol_c, pol_r, ref_c, ref_r, d.beta, reduction="sum", **kwargs)
        pairs = pol_c.shape[0]  # 0 in the padding batch of a rank with fewer eval rows (it still ran its forwards)
        # means -> sums over pairs (a mean over no pairs is NaN: an empty batch contributes 0)
        sums = {k: v * pairs if pairs else torch.zeros_like(v) for k, v in means.items()}
        sums["chosen_nll"] = nll_sum.detach()
        if d.nll_weight:
            sums["preference_loss"] = loss_sum.detach()
            loss_sum = loss_sum + d.nll_weight * nll_sum
        return loss_sum / global_weight, sums


from .data.pretrain import PretrainTask  # noqa: E402  (it imports this module's helpers lazily)

TASKS = {"sft": SFTTask, "dpo": DPOTask, "pretrain": PretrainTask}
