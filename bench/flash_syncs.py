"""Host-device syncs per forward on the flash_attention_2 path: position-id detection vs the
boundaries llmtrain's collate precomputes (`cu_seq_lens`, `max_segment_len`).

  python bench/flash_syncs.py [--arch llama|qwen2|mistral|gpt2] [--layers 4]

Runs on CPU with the pure-PyTorch flash kernels (llmtrain/models/flash_reference.py) and counts, per
forward, every operation that reads a device tensor on the host (Tensor.__bool__/item/tolist/
__int__/__index__/nonzero: on a GPU each one waits for the device), grouped by where it happens,
plus the calls of transformers' packed-sequence detectors. The stand-in's own bookkeeping
(`cu_seqlens.tolist()` in flash_reference._segments, which the CUDA kernel does not do) is left
out; its `int(max_seqlen)` of a tensor is counted, since the CUDA kernel converts that argument
the same way. Inputs "position_ids only" are what llmtrain passed before the fix; "varlen
kwargs" what `tasks.model_inputs` passes now. Counts are exact (no timing involved).
"""
import argparse
import collections
import os
import sys
import traceback

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

SYNC_OPS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
            torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensors by source location (first frame outside torch)."""

    def __init__(self):
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            loc = f"{os.path.basename(frame.filename)}:{frame.name}"
            if not (loc == "flash_reference.py:_segments" and func is torch.Tensor.tolist):
                self.where[f"{loc} ({func.__name__})"] += 1
        return func(*args, **(kwargs or {}))


def count_calls(module, names, counts: collections.Counter) -> None:
    for name in names:
        fn = getattr(module, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            counts[_name] += 1
            return _fn(*a, **k)
        setattr(module, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import masking_utils
    from transformers import modeling_flash_attention_utils as fa_utils

    from conftest import TINY, TOKENIZER
    from llmtrain.models import flash_reference
    from llmtrain.data.batching import collate_sequences
    from llmtrain.objectives.lm_forward import model_inputs

    flash_reference.install()
    calls: collections.Counter = collections.Counter()  # module functions are looked up at call time
    count_calls(fa_utils, ["_is_packed_sequence", "prepare_fa_kwargs_from_position_ids"], calls)
    count_calls(masking_utils, ["find_packed_sequence_indices"], calls)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    spec = dict(TINY[args.arch])
    spec["n_layer" if args.arch == "gpt2" else "num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
    rng = np.random.default_rng(0)
    seqs = [(ids, ids) for ids in (rng.integers(3, len(tok), n).astype(np.int32) for n in (9, 14, 6, 11, 8, 5))]
    print(f"arch={args.arch} layers={args.layers} torch={torch.__version__} device=cpu, 6 sequences of 5-14 tokens")
    print(f"{'attention':<18} {'rows':>4}  {'inputs':<18} {'syncs':>5}  detector calls / where")
    for attn in ("flash_attention_2", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
        for rows in ([seqs], [seqs[:3], seqs[3:]]):
            batch = collate_sequences(rows, tok.pad_token_id)
            variants = {"position_ids only": {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                                              "use_cache": False}}
            if attn.startswith("flash"):
                variants["varlen kwargs"] = model_inputs(model, batch)
            for name, inputs in variants.items():
                calls.clear()
                with torch.no_grad(), SyncCounter() as counter:
                    model(**inputs)
                total = sum(counter.where.values())
                print(f"{attn:<18} {len(rows):>4}  {name:<18} {total:>5}  {dict(calls)}")
                for loc, n in sorted(counter.where.items()):
                    print(f"{'':<45}{n:>3} x {loc}")


if __name__ == "__main__":
    main()
