"""The language-model forward every objective shares: a collated (packed) batch in, per-token label
log-probs out, the LM head optionally chunked so the (B, T, V) logits never exist."""
from __future__ import annotations

import contextlib

import torch

from ..data.labels import IGNORE_INDEX
from ..errors import ConfigError
from ..models import sequence_parallel
from ..losses import shift_labels, token_logps_and_sum_ce, token_logps_from_logits


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
    batch = aligned(batch)
    targets = batch["targets"]  # (B, T): targets[:, t] = labels[:, t + 1]; under SP this rank's slice
    inputs = model_inputs(engine, batch)
    if chunk_tokens <= 0:
        out = engine(**inputs)
        return token_logps_from_logits(out.logits, targets), targets
    with _chunked_lm_head(engine, targets, chunk_tokens):
        out = engine(**inputs)
    return out.logits, targets  # the head returned (B, T) log-probs in place of logits


def aligned(batch: dict) -> dict:
    """The batch with pre-shifted `targets` and `target_seq_index`; under sequence parallelism
    this rank's slice of the flattened row (models.sequence_parallel.shard_batch). Idempotent."""
    if "targets" in batch:
        return batch
    sp = sequence_parallel.active()
    if sp is not None:
        return sequence_parallel.shard_batch(batch, sp.size, sp.rank)
    targets = shift_labels(batch["labels"])
    out = dict(batch, targets=targets)
    if "seq_index" in batch:
        seq_ids = shift_labels(batch["seq_index"])  # (B, T): sequence of the token each position predicts
        out["target_seq_index"] = torch.where(targets == IGNORE_INDEX, torch.full_like(seq_ids, -1), seq_ids)
    return out


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
