"""Checkpoints (save, find, resume, retention) and the Hugging Face export of final/.

Layout under output_dir/checkpoints/:
  step_00000100/            DeepSpeed's files (model, optimizer, LR scheduler, per rank)
                trainer_state.json   step, tokens seen, data position, identity of data/tokenizer/batch
                rng/rank_<r>.pt      python, numpy, torch CPU (and CUDA) generators of rank r
                COMPLETE             written last, by rank 0, after every rank finished writing
  latest                    tag of the newest complete checkpoint (replaced atomically)
A checkpoint without COMPLETE never counts: a run killed mid-save resumes from the one before.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from . import dist
from .config import Config, ConfigError

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def ckpt_root(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, "trainer_state.json"))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _TAG.match(name)
        if m and is_complete(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save / load


def save(engine, cfg: Config, trainer_state: dict) -> str:
    """Every rank writes its part; rank 0 marks the checkpoint complete after a barrier."""
    root = ckpt_root(cfg)
    tag = tag_for(trainer_state["step"])
    path = os.path.join(root, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a killed run (a complete one would have been resumed)
    dist.barrier()
    # LoRA: the frozen base is not saved (it is model.name_or_path): only adapter + optimizer state
    engine.save_checkpoint(root, tag=tag, save_latest=False, exclude_frozen_parameters=_is_lora(engine))
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(path, "rng", f"rank_{engine.global_rank}.pt"))
    if dist.is_main():
        _write_atomic(os.path.join(path, "trainer_state.json"), json.dumps(trainer_state, indent=1))
    dist.barrier()  # every rank's files are on disk before the marker says so
    if dist.is_main():
        _write_atomic(os.path.join(path, COMPLETE), "")
        _write_atomic(os.path.join(root, "latest"), tag)
        prune(root, cfg.train.keep_last)
    dist.barrier()
    return path


def prune(root: str, keep_last: int) -> None:
    """Delete old checkpoints beyond keep_last, and incomplete ones older than the newest complete.
    Runs on rank 0; a failed delete is a warning, never the end of the run."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    newest_step = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]] if keep_last < len(complete) else []
    for name in os.listdir(root):
        m = _TAG.match(name)
        p = os.path.join(root, name)
        if m and int(m.group(1)) < newest_step and not is_complete(p):
            doomed.append(p)
    for p in doomed:
        try:
            marker = os.path.join(p, COMPLETE)
            if os.path.exists(marker):
                os.remove(marker)  # first un-mark, so a crash mid-delete leaves it ignored, not half-loaded
            shutil.rmtree(p)
        except OSError as e:
            dist.warn(f"could not delete old checkpoint {p}: {e}")


def find_resume(cfg: Config) -> Optional[str]:
    """Checkpoint to resume from per train.resume, or None for a fresh start."""
    mode = cfg.train.resume
    root = ckpt_root(cfg)
    if mode == "never":
        return None
    if mode == "auto":
        complete = complete_checkpoints(root)
        return complete[-1][1] if complete else None
    path = mode
    if not os.path.isdir(path):
        raise ConfigError(f"{cfg.where('train.resume')}: checkpoint {path!r} not found; use auto, never or an existing checkpoint directory")
    if not is_complete(path):
        raise ConfigError(f"{cfg.where('train.resume')}: checkpoint {path!r} is incomplete (no {COMPLETE} marker); pick a complete one")
    return path


def saved_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def universal_dir(path: str) -> str:
    return os.path.normpath(path) + "_universal"  # not a step_N name: never picked by resume=auto


def convert_to_universal(path: str) -> str:
    """A checkpoint written by N ranks -> DeepSpeed's universal format, loadable by any number of
    ranks (ZeRO 1-3 partition the optimizer state by rank). Rank 0 converts once; others wait."""
    out = universal_dir(path)
    if dist.is_main() and not os.path.isfile(os.path.join(out, COMPLETE)):
        import subprocess
        import sys

        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
               "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"train.resume: converting {path} to a universal checkpoint failed: "
                              f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        for name in ("trainer_state.json",):
            shutil.copy2(os.path.join(path, name), os.path.join(out, name))
        _write_atomic(os.path.join(out, COMPLETE), "")
    dist.barrier()
    return out


def _weights_only_engine():
    """DeepSpeed's checkpoint engine, but loading with torch.load(weights_only=True): a checkpoint
    path can come from anywhere (train.resume), and unpickling it must not run code. Only the few
    plain DeepSpeed classes its states hold are allowed besides tensors and containers."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # pickle.UnpicklingError names the object it refused
                raise ConfigError(f"train.resume: {path} holds objects outside the safe list "
                                  f"({str(e).strip().splitlines()[0][:200]}); refusing to unpickle it") from None

    return WeightsOnlyCheckpointEngine()


def load(engine, path: str) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return trainer_state."""
    engine.checkpoint_engine = _weights_only_engine()
    root, tag = os.path.split(os.path.normpath(path))
    # LoRA checkpoints lack the frozen base weights (loaded from model.name_or_path): not strict
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                          load_module_strict=not _is_lora(engine))
    if load_path is None:
        raise ConfigError(f"train.resume: DeepSpeed could not load {path}")
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    rng_file = os.path.join(path, "rng", f"rank_{engine.global_rank}.pt")
    if os.path.exists(rng_file):  # absent when the world size changed: data order stays exact, dropout does not
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# --------------------------------------------------------------------------- export


def _is_lora(engine) -> bool:
    from .lora import is_peft

    return is_peft(engine.module)


def export_hf(engine, tokenizer, out_dir: str, stage: int) -> None:
    """Write a Hugging Face model directory (safetensors + tokenizer), replacing out_dir atomically.

    Under ZeRO-3 the shards are gathered one parameter group at a time into a 16-bit (or
    training-dtype) state dict on rank 0: a collective, so every rank must call this.
    LoRA runs write the adapter in PEFT format (only trainable tensors are gathered), and with
    lora.merge also out_dir/merged/: the base from model.name_or_path with the adapter merged in.
    """
    lora = _is_lora(engine)
    if stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
    else:
        state_dict = engine.module.state_dict() if dist.is_main() else None
    if dist.is_main():
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        model.config.use_cache = True  # inference default for whoever loads it
        model.save_pretrained(tmp, state_dict=state_dict)
        model.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        export = getattr(model, "llmtrain_export", {}) if lora else {}
        if export.get("merge"):
            from .lora import merge_into_base

            merge_into_base(tmp, os.path.join(tmp, "merged"), dtype=export["dtype"],
                            trust_remote_code=export.get("trust_remote_code", False))  # revision: in adapter_config.json
        if os.path.isdir(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    dist.barrier()
