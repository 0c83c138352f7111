"""Checkpoints (save, find, resume, retention, full-disk handling) and the Hugging Face export of final/.

Layout under output_dir/checkpoints/:
  step_00000100/            DeepSpeed's files (model, optimizer, LR scheduler, per rank)
                trainer_state.json   step, tokens seen, data position, identity of data/tokenizer/batch,
                                     run_id (the run that wrote it) and save_id (this save)
                rng/rank_<r>.pt      python, numpy, torch CPU (and CUDA) generators of rank r
                data/rank_<r>.pt     rank r's data state where the data keeps one (RL: the current rollout)
                <name>/              DeepSpeed's files of a further trained engine (Objective.extra_engines,
                                     e.g. PPO's critic/); trainer_state.json lists the names
                COMPLETE             written last, by rank 0, after every rank finished writing
                                     (JSON: the checkpoint's size in bytes)
  step_00000100_universal/  the same checkpoint in DeepSpeed's universal format, made when a run
                            resumes it at another world size (universal.py; <name>/ engines converted
                            into <name>/ of it); pruned with it
  latest                    tag of the newest complete checkpoint (replaced atomically)
A checkpoint without COMPLETE never counts: a run killed mid-save resumes from the one before.
A save that fails on any rank (a full disk) is agreed by every rank, its partial directory is
removed and the run ends with one line (StorageError, exit status 5); `latest` keeps pointing at
the last complete checkpoint. Before each save, every rank checks that its filesystem has at least
the previous checkpoint's size free, and the run stops before writing anything if not.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import uuid
from typing import Optional

import numpy as np
import torch

from .. import distributed as dist
from ..config import Config
from ..distributed import waiting
from ..errors import ConfigError, StorageError
from . import ckpt_engine, optim

COMPLETE = "COMPLETE"
RUN_ID = "run_id"  # output_dir/run_id: identity of the run that owns output_dir
_TAG = re.compile(r"^step_(\d+)$")
_UNIVERSAL = re.compile(r"^(step_\d+)_universal$")


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


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------- run identity


def write_run_id(output_dir: str, fresh: bool) -> str:
    """Rank 0: a new identity for a fresh run, the existing one when resuming."""
    path = os.path.join(output_dir, RUN_ID)
    if not fresh and os.path.isfile(path):
        return read_run_id(output_dir)
    run_id = uuid.uuid4().hex
    write_atomic(path, run_id + "\n")
    return run_id


def read_run_id(output_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(output_dir, RUN_ID)) as f:
            return f.read().strip() or None
    except OSError:
        return None


# --------------------------------------------------------------------------- disk space


def dir_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def free_bytes(path: str) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest existing parent);
    quotas are not included (see check_free_space)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def free_text(path: str) -> str:
    return f"{mib(free_bytes(path))} free on its filesystem"


def checkpoint_bytes(path: str) -> int:
    """Size recorded in COMPLETE at save time (one small read), else measured."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            return int(json.load(f)["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return dir_bytes(path)


def _last_complete_text(root: str) -> str:
    complete = complete_checkpoints(root)
    return f"last complete checkpoint: {complete[-1][1]} (`latest` points at it)" if complete else \
        "no complete checkpoint yet"


def check_free_space(root: str, tag: str) -> None:
    """Every rank: fail (all together, before writing) when its filesystem has less free space than the
    previous checkpoint took. Failing early rather than warning: checkpoints of a run all have the same
    size, so the write would fail after minutes of I/O; stopping now writes nothing, removes nothing and
    the message says how much to free. One all_gather per save (a few bytes per rank).

    Free space means the filesystem's (statvfs, as `df` shows it). Per-user, group or project quotas on
    shared filesystems (Lustre `lfs quota`, GPFS `mmlsquota`, NFS user quotas) are not visible there and
    are not read: asking them is filesystem-specific, a subprocess per rank per save, and often not
    allowed on compute nodes. XFS/ext4 project quotas (and NFS exports of them) do show in statvfs. A
    write that hits a quota (EDQUOT, "Disk quota exceeded") ends like a full disk: one line, the
    partial checkpoint removed, `latest` kept."""
    complete = complete_checkpoints(root)
    need = checkpoint_bytes(complete[-1][1]) if complete else 0
    mine = (dist.rank(), dist.host_name(), free_bytes(root), need)
    short = [x for x in dist.all_gather_object(mine) if x[2] < x[3]]
    if short:
        r, host, free, need = short[0]
        raise StorageError(
            f"checkpoint {os.path.join(root, tag)} not written: {mib(free)} free on the filesystem of rank {r} "
            f"(host {host}), the previous checkpoint took {mib(need)}; {_last_complete_text(root)}; free space "
            "(or lower train.keep_last) and resume with train.resume=auto")


def fault_fill_disk(where: str, path: str) -> None:
    """Test hook: LLMTRAIN_FAULT_FILL_DISK=step_N|final (on LLMTRAIN_FAULT_RANK, default 0) fills the
    filesystem of `path` to 64 KiB, as another job on a shared disk would, before that write starts."""
    if os.environ.get("LLMTRAIN_FAULT_FILL_DISK") != where or dist.rank() != int(os.environ.get("LLMTRAIN_FAULT_RANK", "0")):
        return
    ballast = os.path.join(os.path.dirname(os.path.abspath(path)), ".fault_ballast")
    with open(ballast, "ab") as f:
        size = free_bytes(ballast) - 64 * 1024
        if size > 0:
            os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, size)


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


def derived_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a rank that has no saved generators (a resume on more ranks): fixed by (train.seed, step, rank)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:4], "little")


def restore_rng(path: str, seed: int, step: int, saved_world: int) -> None:
    """Rank r continues its saved generators when the checkpoint has them (r < saved world size);
    a rank beyond the saved world starts from derived_seed(train.seed, step, r)."""
    rank = dist.rank()
    rng_file = os.path.join(path, "rng", f"rank_{rank}.pt")
    if os.path.exists(rng_file):
        try:  # weights-only like every other resume load: a refusal is one line, not a traceback
            state = torch.load(rng_file, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ckpt_engine.refusal(rng_file, e) from None
        set_rng_state(state)
    else:
        s = derived_seed(seed, step, rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
    world = dist.world_size()
    if world != saved_world:
        kept = min(world, saved_world)
        verb = "continues its" if kept == 1 else "continue their"
        text = f"resume: {saved_world} -> {world} ranks: {_ranks(0, kept - 1)} {verb} saved RNG streams"
        if world > kept:
            verb = "starts" if world - kept == 1 else "start"
            text += f", {_ranks(kept, world - 1)} {verb} from seeds derived from (train.seed, step, rank)"
        dist.print0(text + "; data order is exact, dropout masks differ from an uninterrupted run")


def _ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


# --------------------------------------------------------------------------- save / prune


def save(engine, cfg: Config, trainer_state: dict, extra: Optional[dict] = None,
         rank_data: Optional[dict] = None) -> str:
    """Every rank writes its part; rank 0 marks the checkpoint complete once every rank's write succeeded.
    extra: {name: engine} of further trained models (Objective.extra_engines), each written as a
    DeepSpeed checkpoint in <checkpoint>/<name>/ before COMPLETE. rank_data: this rank's data state
    (TrainData.rank_state), in <checkpoint>/data/rank_<r>.pt.

    Sync points: one all_gather for the space check, DeepSpeed's own barriers, one all_gather of the
    write outcome, one broadcast of rank 0's commit. A failed write anywhere ends every rank with the
    same StorageError after rank 0 removed the partial directory (no rank is left in a barrier)."""
    root = ckpt_root(cfg)
    tag = tag_for(trainer_state["step"])
    path = os.path.join(root, tag)
    check_free_space(root, tag)
    if dist.is_main():
        # an incomplete leftover of a killed run, or a save under this tag by an earlier attempt: its
        # universal copy describes the old save, so it goes too
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path + "_universal", ignore_errors=True)
    dist.barrier()
    fault_fill_disk(tag, path)
    writer = ckpt_engine.install(engine)
    # LoRA: the frozen base is not saved (it is model.name_or_path): only adapter + optimizer state
    engine.save_checkpoint(root, tag=tag, save_latest=False, exclude_frozen_parameters=is_lora(engine))
    errors = list(writer.errors)
    for name, other in (extra or {}).items():
        if errors:
            break
        other_writer = ckpt_engine.install(other)
        other.save_checkpoint(path, tag=name, save_latest=False, exclude_frozen_parameters=is_lora(other))
        errors = list(other_writer.errors)
    if not errors:
        try:
            os.makedirs(os.path.join(path, "rng"), exist_ok=True)
            torch.save(rng_state(), os.path.join(path, "rng", f"rank_{dist.rank()}.pt"))
            if rank_data is not None:  # e.g. RL's current rollout (rollout.RolloutData.rank_state)
                os.makedirs(os.path.join(path, "data"), exist_ok=True)
                torch.save(rank_data, os.path.join(path, "data", f"rank_{dist.rank()}.pt"))
            if dist.is_main():
                state = {**trainer_state, "run_id": read_run_id(cfg.output_dir), "save_id": uuid.uuid4().hex}
                write_atomic(os.path.join(path, "trainer_state.json"), json.dumps(state, indent=1))
        except (OSError, RuntimeError) as e:
            errors = [(path, waiting.one_line(e))]
    failed = [(r, p, why) for r, errs in enumerate(dist.all_gather_object(errors)) for p, why in errs[:1]]
    if not failed:  # every rank's files are on disk: rank 0 may say so
        failed = dist.broadcast_object(_commit(root, tag, path) if dist.is_main() else None)
    if failed:
        _abandon(root, path, failed)
    if dist.is_main():
        prune(root, cfg.train.keep_last)
    dist.barrier()
    return path


def _commit(root: str, tag: str, path: str) -> list:
    """Rank 0: COMPLETE (with the size, read by the next save's space check), then `latest`."""
    try:
        write_atomic(os.path.join(path, COMPLETE), json.dumps({"bytes": dir_bytes(path)}))
        write_atomic(os.path.join(root, "latest"), tag)
    except OSError as e:
        if os.path.exists(os.path.join(path, COMPLETE)):
            os.remove(os.path.join(path, COMPLETE))  # `latest` must name the newest complete checkpoint
        return [(0, path, waiting.one_line(e))]
    return []


def _abandon(root: str, path: str, failed: list) -> None:
    """Every rank: rank 0 removes the partial checkpoint, then all raise the same one-line StorageError.
    A plain barrier here, not waiting.one_rank_does: removing a directory is bounded (far below
    dist.timeout_minutes) and a marker file could not be written on a disk that is still full."""
    free_at_failure = free_bytes(root)
    if dist.is_main():
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    rank, where, why = failed[0]
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise StorageError(
        f"checkpoint {path} could not be written: rank {rank}{others}: {why} ({os.path.basename(where)}); "
        f"{mib(free_at_failure)} free on its filesystem when the write failed, {mib(free_bytes(root))} after "
        f"removing the partial checkpoint; {_last_complete_text(root)}; free space and resume with train.resume=auto")


def prune(root: str, keep_last: int) -> None:
    """Delete old checkpoints beyond keep_last (with their universal copies), incomplete ones older than
    the newest complete, and universal copies whose checkpoint is gone. Runs on rank 0; a failed delete
    is a warning, never the end of the run."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    newest_step = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]] if keep_last < len(complete) else []
    kept = {os.path.basename(p) for _, p in complete} - {os.path.basename(p) for p in doomed}
    for name in os.listdir(root):
        m, u = _TAG.match(name), _UNIVERSAL.match(name)
        p = os.path.join(root, name)
        if m and int(m.group(1)) < newest_step and not is_complete(p):
            doomed.append(p)
        elif u and u.group(1) not in kept:  # a full fp32 copy: it goes with its checkpoint
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


# --------------------------------------------------------------------------- load


def load(engine, path: str, seed: int, extra: Optional[dict] = None) -> dict:
    """Restore model, optimizer, scheduler and RNG (restore_rng's rule); return trainer_state.
    extra: {name: engine} restored from <path>/<name>/ (see save). Every torch.load on the way is
    weights-only (ckpt_engine.py lists DeepSpeed's loads per path)."""
    root, tag = os.path.split(os.path.normpath(path))
    _load_engine(engine, root, tag, path)
    for name, other in (extra or {}).items():
        if not os.path.isdir(os.path.join(path, name)):
            raise ConfigError(f"train.resume: {path} has no {name}/ (a checkpoint of a run without a {name}); "
                              "start a new output_dir or resume a checkpoint of this task")
        _load_engine(other, path, name, os.path.join(path, name))
    state = saved_state(path)
    restore_rng(path, seed, state["step"], state.get("world_size", dist.world_size()))
    return state


def load_rank_data(path: str) -> Optional[dict]:
    """This rank's saved data state (save's rank_data), or None (none saved, or a rank beyond the saved world)."""
    f = os.path.join(path, "data", f"rank_{dist.rank()}.pt")
    if not os.path.exists(f):
        return None
    try:
        return torch.load(f, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ckpt_engine.refusal(f, e) from None


def _load_engine(engine, root: str, tag: str, path: str) -> None:
    ckpt_engine.install(engine)
    zero3_universal = engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3
    settings = optim.group_settings(engine) if zero3_universal else None
    with ckpt_engine.weights_only_loads(f"a file under {path}"):
        # LoRA checkpoints lack the frozen base weights (loaded from model.name_or_path): not strict
        load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                              load_module_strict=not is_lora(engine))
    if load_path is None:
        raise ConfigError(f"train.resume: DeepSpeed could not load {path}")
    if zero3_universal:
        optim.repair_zero3_universal_load(engine, settings)


def is_lora(engine) -> bool:
    from ..models.lora import is_peft

    return is_peft(engine.module)
