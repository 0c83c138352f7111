"""The Hugging Face export of final/: gathered weights written by rank 0, swapped in atomically.

final/ holds config.json, *.safetensors, the tokenizer and llmtrain.json ({"step": N}: the optimizer
step it was exported at, so a rerun after a failed export knows final/ is stale); LoRA runs write
the adapter (PEFT format) and, with lora.merge, final/merged/.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from safetensors import SafetensorError

from .. import distributed as dist
from ..config import DistConfig
from ..distributed import waiting
from ..errors import StorageError
from .checkpoint import fault_fill_disk, free_bytes, is_lora, mib, write_atomic

# what a full disk or an I/O error raises while writing: OSError (open, makedirs), RuntimeError (torch.save:
# "unexpected pos"), SafetensorError ("I/O error: No space left on device")
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
FINAL_STATE = "llmtrain.json"  # final/llmtrain.json: {"step": N}, the optimizer step final/ was exported at


def exported_step(out_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(out_dir, FINAL_STATE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_hf(engine, tokenizer, out_dir: str, stage: int, wait_minutes: float = DistConfig.wait_minutes,
              step: Optional[int] = None, stale_minutes: float = DistConfig.stale_minutes,
              marker_dir: Optional[str] = None) -> None:
    """Write a Hugging Face model directory (safetensors + tokenizer), replacing out_dir atomically.

    Under ZeRO-3 the shards are gathered one parameter group at a time into a 16-bit (or
    training-dtype) state dict on rank 0: a collective, so every rank must call this. Rank 0 then
    writes (and, for LoRA with lora.merge, merges) while the others poll for its marker
    (waiting.one_rank_does, up to `wait_minutes`, or `stale_minutes` after rank 0's heartbeat stopped):
    a merge of a 70B base takes longer than any collective timeout. LoRA runs write the adapter in PEFT format (only trainable tensors are
    gathered), and with lora.merge also out_dir/merged/: the base with the adapter merged in.
    marker_dir: where the waiting ranks' markers go (default: beside out_dir; an export inside final/
    puts them elsewhere). A failed write (full disk) removes its temporary directory, keeps the previous out_dir as it was
    and ends every rank with one line (StorageError, exit status 5).
    """
    lora = is_lora(engine)
    if stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
    elif _autotp_size(engine) > 1:
        # AutoTP: engine.module holds this rank's shards; gathered into whole tensors on rank 0
        # (a collective: every rank calls it; engine.py:5571-5612)
        state_dict = engine._consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if dist.is_main() else None
    merge = lora and getattr(engine.module, "llmtrain_export", {}).get("merge")
    what = f"write {out_dir}" + (" and merge the LoRA adapter into its base" if merge else "")
    waiting.one_rank_does(lambda: _write_final(engine.module, tokenizer, state_dict, out_dir, lora, step),
                          name="final", what=what, marker_dir=marker_dir or os.path.dirname(os.path.abspath(out_dir)),
                          timeout_minutes=wait_minutes, stale_minutes=stale_minutes)


def _autotp_size(engine) -> int:
    size = getattr(engine, "autotp_size", None)
    return int(size() or 1) if callable(size) else 1


def _write_final(model, tokenizer, state_dict, out_dir: str, lora: bool, step: Optional[int]) -> None:
    """Rank 0: write out_dir.tmp completely, then swap it in (the old out_dir is replaced only then)."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fault_fill_disk("final", tmp)
    try:
        model.config.use_cache = True  # inference default for whoever loads it
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            model.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        export = getattr(model, "llmtrain_export", {}) if lora else {}
        if export.get("merge"):
            from ..models.lora import merge_into_base

            merge_into_base(tmp, os.path.join(tmp, "merged"), dtype=export["dtype"],
                            trust_remote_code=export.get("trust_remote_code", False))  # revision: in adapter_config.json
        if step is not None:
            write_atomic(os.path.join(tmp, FINAL_STATE), json.dumps({"step": step}))
    except BaseException as e:
        free_at_failure = free_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half export filling the disk
        if not isinstance(e, _WRITE_ERRORS):
            raise
        old = f"the previous {out_dir} (step {exported_step(out_dir) or '?'}) is untouched" if os.path.isdir(out_dir) \
            else f"no {out_dir} was written"
        raise StorageError(
            f"writing {out_dir} failed: {waiting.one_line(e)}; {mib(free_at_failure)} free on its filesystem when it "
            f"failed; {old}; the trained state is in the last checkpoint; free space and rerun with "
            "train.resume=auto (it exports again without training)") from None
    if os.path.isdir(out_dir):
        old = out_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
