"""Rollout generation with the model as trained (the `hf` backend): transformers `generate` on the
DeepSpeed engine's module, ZeRO-3 included.

ZeRO-3, two ways (rl.zero3_gather):
* true (default): gather every parameter once per rollout (GatheredParameters), take DeepSpeed's
  module hooks off, generate at unsharded speed, put the hooks back (TRL's way). One all-gather of
  the model per rollout, for the price of a full replica in memory while generating. Keeping the
  hooks inside the gather crashes ("Cannot partition a param in flight").
* false: the hooks gather each layer at every forward, i.e. the whole model once per generated
  token; every rank must then run the same number of forwards: `synced_gpus=True`, passed
  explicitly because llmtrain drops its HfDeepSpeedConfig after loading, so transformers' own
  default would be False and ranks finishing at different lengths deadlock.
Greedy generation either way gives bitwise the unsharded model's tokens (tests/integration/test_rl.py).
"""
from __future__ import annotations

import contextlib

import torch

from ... import distributed as dist
from .sampling import GumbelSampler


def _offload(engine):
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        return None
    return opt.parameter_offload if hasattr(opt, "parameter_offload") else opt


def _remove_hooks(engine) -> None:
    off = _offload(engine)
    if off is None:
        return
    for p in off.module.parameters(recurse=True):
        p.ds_active_sub_modules.clear()
    for hook in off.forward_hooks + off.backward_hooks:
        hook.remove()
    off.forward_hooks, off.backward_hooks = [], []


def _add_hooks(engine) -> None:
    off = _offload(engine)
    if off is None:
        return
    coordinator = getattr(off, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the recorded fetch order belongs to training forwards
    off._register_deepspeed_module(off.module)


@contextlib.contextmanager
def generation_mode(engine, stage: int, gather: bool):
    """Eval mode (no dropout, no checkpointing) and, under ZeRO-3, the parameters ready to generate.
    Yields synced_gpus for `generate`. Collective under ZeRO-3: every rank enters it together."""
    was_training = engine.module.training
    engine.module.eval()
    try:
        if stage != 3:
            yield False
        elif gather:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                _remove_hooks(engine)
                try:
                    yield False
                finally:
                    _add_hooks(engine)
        else:
            yield dist.world_size() > 1
    finally:
        engine.module.train(was_training)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids, attention_mask) (B, W), padded on the left so generation continues every row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def cut_at_stop(row: list[int], stop_ids: set) -> tuple[list[int], bool]:
    """Completion up to and including its first stop token (the stop is trained: it ends the answer);
    (tokens, truncated) where truncated means no stop token within the budget."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1], False
    return row, True


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, keys, seed: int, temperature: float, top_p: float,
             max_new_tokens: int, stop_ids: list[int], pad_id: int, batch_size: int, synced_gpus: bool,
             device) -> list[tuple[list[int], bool]]:
    """Completions of each prompt: sampled with the per-row keyed sampler (keys[i] for prompt i), or
    greedy when keys is None. With synced_gpus every rank must call this with the same number of
    batches (the caller pads with dummy prompts)."""
    out = []
    stops = set(stop_ids)
    for a in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[a: a + batch_size], pad_id)
        kw = {}
        if keys is not None:
            kw["logits_processor"] = [GumbelSampler(seed, keys[a: a + batch_size], ids.shape[1], temperature, top_p)]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
                             synced_gpus=synced_gpus, **kw)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(cut_at_stop(row, stops))
    return out


def batches_needed(n: int, batch_size: int, device) -> int:
    """The most generate calls any rank makes (one all-reduce): under the hooks path every rank runs as many."""
    mine = torch.tensor(float(-(-n // batch_size)), device=device)
    if dist.world_size() == 1:
        return int(mine)
    import torch.distributed as tdist

    tdist.all_reduce(mine, op=tdist.ReduceOp.MAX)
    return int(mine)
