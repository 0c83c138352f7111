"""Ulysses sequence parallelism (DeepSpeed ALST, `deepspeed.runtime.sequence_parallel.ulysses_sp`):
each rank of an SP group holds 1/SP of every packed row; attention all-to-alls q/k/v from
sequence-sharded to head-sharded, attends over the whole row with heads/SP heads, and back.

What llmtrain adds to DeepSpeed's parts, and why:
- `shard_batch`: every rank of an SP group got the same collated micro-batch (the planner deals
  rows over DP ranks only); each keeps its contiguous 1/SP slice. The rows are flattened into one
  (1, B*L) row first (position_ids restart per sample, so rows stay separate documents): DeepSpeed
  bakes the micro-batch size into its shape asserts (ulysses_sp.py:161), and transformers' FA2 finds
  packed samples only at batch 1. Labels are shifted over the whole row *before* slicing: the last
  token of chunk r predicts the first of chunk r+1.
- `install_packed_sdpa`: DeepSpeed's wrapper drops the attention mask (ulysses_sp.py:537-546) and
  transformers' sdpa then runs plain causal attention over the gathered row, so packed samples
  would attend to each other. Our core sdpa rebuilds the block-diagonal causal mask from the
  gathered global position_ids (O(S^2) per layer: the CPU/test path; GPUs run flash_attention_2,
  which gets the row's global varlen boundaries, cu_seq_lens, through the wrapper's kwargs).
- `sp_sum`: per-sequence sums (DPO) are partial per rank; a differentiable all-reduce over the group.

The SP state is process-global, as DeepSpeed's is: its wrapper replaces the process-wide
ALL_ATTENTION_FUNCTIONS entry, so every model of the process (DPO's frozen reference too) runs SP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..data.labels import IGNORE_INDEX


@dataclass
class SPGroup:
    size: int
    rank: int
    group: Any  # torch.distributed ProcessGroup of this rank's SP peers
    mpu: Any  # DeepSpeed's parallel_state_sp module (deepspeed.initialize(mpu=...))


_ACTIVE: Optional[SPGroup] = None
_WRAPPED: set = set()  # attention implementations DeepSpeed's wrapper replaced in this process


def active() -> Optional[SPGroup]:
    return _ACTIVE


def size() -> int:
    return _ACTIVE.size if _ACTIVE is not None else 1


def rank() -> int:
    return _ACTIVE.rank if _ACTIVE is not None else 0


def install_packed_sdpa() -> None:
    """ALL_ATTENTION_FUNCTIONS["sdpa"] -> sdpa with the packed rows' block-diagonal causal mask,
    built from the position_ids the Ulysses wrapper all-gathered (ulysses_sp.py:287-296). Must run
    before `register`: DeepSpeed captures the entry it wraps (ulysses_sp.py:492)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def packed_sdpa(module, query, key, value, attention_mask, **kwargs):
        pos = kwargs.get("position_ids")
        if attention_mask is None and pos is not None and query.shape[2] > 1 and _several_documents(pos):
            # an explicit mask sends sdpa to its math kernel, which keeps the S x S probabilities for
            # backward; one document per row keeps is_causal (bench/sp_memory.py shows the difference)
            attention_mask = packed_causal_mask(pos)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = packed_sdpa


def _several_documents(position_ids: torch.Tensor) -> bool:
    """Whether any row restarts its positions (a packed row). .item() syncs the device: the sdpa path
    under SP is the CPU/test path."""
    return bool((torch.diff(position_ids, dim=-1) != 1).any().item())


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) positions -> (B, 1, S, S) bool, True where query i may see key j: same document and
    j <= i. A document starts wherever the position does not step by +1 (the rule of transformers'
    find_packed_sequence_indices)."""
    doc = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # (B, S)
    S = position_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()
    return (doc[:, None, :, None] == doc[:, None, None, :]) & causal


def register(model: torch.nn.Module, sp_size: int) -> SPGroup:
    """Once per process, after the model is loaded and before deepspeed.initialize: DeepSpeed's
    Ulysses attention for the model's attention implementation, and the SP process groups."""
    global _ACTIVE
    attn = model.config._attn_implementation
    if _ACTIVE is not None and attn in _WRAPPED:  # e.g. DPO's frozen reference: already runs through the wrapper
        if sp_size != _ACTIVE.size:
            raise ValueError(f"sequence parallelism of size {_ACTIVE.size} is already set up in this process")
        return _ACTIVE
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    if _ACTIVE is not None:
        # another attention implementation in the same process (several runs in one process): DeepSpeed
        # builds its groups once per call and asserts they are new (parallel_state_sp.py:50); fresh ones
        sp_state._SEQUENCE_PARALLEL_GROUP = sp_state._SEQUENCE_DATA_PARALLEL_GROUP = None
    if attn == "sdpa":
        install_packed_sdpa()
    # micro_batch_size=1: shard_batch flattens every micro-batch into one row;
    # seq_length_is_variable: rows are collated to their longest row, not to max_seq_len
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=sp_size,
        micro_batch_size=1, seq_length_is_variable=True)
    _WRAPPED.add(attn)
    _ACTIVE = SPGroup(size=sp_size, rank=mpu.get_sequence_parallel_rank(), group=mpu.get_sequence_parallel_group(),
                      mpu=mpu)
    return _ACTIVE


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1)  # (B, L) -> (1, B*L)


def shard_batch(batch: dict, sp_size: int, sp_rank: int) -> dict:
    """A collated batch (data.batching.collate_sequences) -> this SP rank's slice, with pre-shifted
    `targets` and `target_seq_index` (the sequence each position predicts into, -1 where nothing
    is trained) so the forward does not shift again. Pads the flattened row to a multiple of SP:
    positions continue the last sample (so the pad never starts a document), targets ignored.
    cu_seq_lens/max_segment_len describe the whole padded row (flash's varlen boundaries after the
    all-to-all). Pure tensor indexing; no communication."""
    targets = _flat(_shift(batch["labels"], IGNORE_INDEX))  # (1, N): targets[t] = labels[t + 1] within a row
    seq_t = _flat(_shift(batch["seq_index"], -1))
    seq_t = torch.where(targets == IGNORE_INDEX, torch.full_like(seq_t, -1), seq_t)
    ids, pos = _flat(batch["input_ids"]), _flat(batch["position_ids"])
    n = ids.shape[1]
    chunk = -(-n // sp_size)
    pad = chunk * sp_size - n
    cu, longest = batch["cu_seq_lens"], batch["max_segment_len"]
    if pad:
        ids = F.pad(ids, (0, pad), value=0)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(pad, device=pos.device)[None]], dim=1)
        targets = F.pad(targets, (0, pad), value=IGNORE_INDEX)
        seq_t = F.pad(seq_t, (0, pad), value=-1)
        cu = torch.cat([cu, cu[-1:] + pad])  # the pad is a segment of its own
        longest = max(longest, pad)
    mine = slice(chunk * sp_rank, chunk * (sp_rank + 1))
    out = {k: v for k, v in batch.items() if k not in ("labels", "seq_index")}
    out.update(input_ids=ids[:, mine], position_ids=pos[:, mine], targets=targets[:, mine],
               target_seq_index=seq_t[:, mine], cu_seq_lens=cu, max_segment_len=longest)
    return out


def _shift(t: torch.Tensor, fill: int) -> torch.Tensor:
    # (B, L) -> (B, L - 1) next positions + (B, 1) fill -> (B, L)
    return torch.cat([t[:, 1:], t.new_full((t.shape[0], 1), fill)], dim=1)


def sp_sum(partial: torch.Tensor) -> torch.Tensor:
    """Sum of the SP ranks' partial sums, differentiable (its backward all-reduces the gradient:
    a loss computed identically on every SP rank must therefore be divided by SP)."""
    if _ACTIVE is None:
        return partial
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(partial, group=_ACTIVE.group)
