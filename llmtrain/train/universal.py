"""Resume at another world size under ZeRO 1-3 through DeepSpeed's universal checkpoint format.

ZeRO partitions the optimizer state (ZeRO-3 also the parameters) by rank, so a checkpoint written
by N ranks cannot be loaded by M != N ranks as it is. DeepSpeed's converter
(deepspeed.checkpoint.ds_to_universal) rewrites it as one file per parameter and state:
checkpoints/<tag>_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, which any number of
ranks can load (`"checkpoint": {"load_universal": true}` in the DeepSpeed config, set by the runner).

Cost: the converter reads every shard and writes a full fp32 copy of the trainable weights and
both Adam moments (12 bytes per trainable parameter, e.g. ~84 GB for a 7B full fine-tune) on
rank 0, plus as much again of temporary fragments (removed at the end); time grows linearly with
that size (bench/universal_convert.py measures it). It runs DeepSpeed's own worker pools
(--num_extract_workers: one process per ZeRO shard file, each holding that whole shard in memory;
--num_merge_workers: one per parameter, each holding ~2 copies of that parameter's fp32 state):
converter_workers() picks min(CPUs, 8) of each, bounded by the memory available for them.
The copy is kept beside its checkpoint and pruned with it (checkpoint.prune); it records which
save of the checkpoint it came from, so a copy left from an older save under the same tag is
never used.

Safety: the converter runs in a subprocess (`python -m llmtrain.train.universal`) under
TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, so it unpickles nothing beyond tensors, containers and the
allow-listed DeepSpeed classes (see ckpt_engine.py). On top of that only checkpoints of this
run are converted: one under output_dir/checkpoints whose trainer_state.json carries this
output_dir's run identity; any other needs train.resume_allow_foreign=true.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch

from .. import distributed as dist
from ..config import Config
from ..distributed import waiting
from ..errors import ConfigError
from . import checkpoint

ERROR_PREFIX = "llmtrain-universal-error: "


def universal_dir(root: str, source: str) -> str:
    """<root>/<tag>_universal: not a step_N name, so resume=auto never picks it."""
    return os.path.join(root, os.path.basename(os.path.normpath(source)) + "_universal")


def check_origin(cfg: Config, source: str, saved: dict) -> None:
    """Refuse (one line) to convert a checkpoint that did not come from this output_dir's run."""
    root = os.path.realpath(checkpoint.ckpt_root(cfg))
    reasons = []
    if not os.path.realpath(source).startswith(root + os.sep):
        reasons.append(f"it lies outside {root}")
    run_id = checkpoint.read_run_id(cfg.output_dir)
    if saved.get("run_id") is None:
        reasons.append("its trainer_state.json carries no run identity (written by an older llmtrain)")
    elif saved.get("run_id") != run_id:
        reasons.append(f"its trainer_state.json names run {saved['run_id']}, this output_dir is run {run_id}")
    if not reasons:
        return
    if not cfg.train.resume_allow_foreign:
        raise ConfigError(
            f"{cfg.where('train.resume')}: {source} did not come from this run ({'; '.join(reasons)}); resuming it at "
            "another world size converts it with DeepSpeed's converter (weights-only loads, a full fp32 copy written "
            f"into {root}): set train.resume_allow_foreign=true if you trust it, or resume it at its own world size "
            f"({saved.get('world_size', '?')} ranks)")
    dist.print0(f"warning: converting a checkpoint from another run (train.resume_allow_foreign): {'; '.join(reasons)}")


def is_current(out: str, source: str) -> bool:
    """A finished conversion of exactly this save of `source` (not an older save under the same tag)."""
    try:
        with open(os.path.join(out, checkpoint.COMPLETE)) as f:
            made_from = json.load(f)
        save_id = checkpoint.saved_state(source).get("save_id")
    except (OSError, ValueError):
        return False
    return save_id is not None and made_from.get("save_id") == save_id and \
        made_from.get("source") == os.path.realpath(source)


def prepare(cfg: Config, source: str, extra: Sequence[str] = ()) -> str:
    """Every rank calls this: rank 0 converts `source` (unless a current copy exists) while the others
    poll for its marker (waiting.one_rank_does: up to dist.wait_minutes, or dist.stale_minutes after rank 0's
    heartbeat stopped); returns the universal dir. extra: the names of further engines saved inside the
    checkpoint (<source>/<name>/, e.g. PPO's critic): each converted too, into <universal dir>/<name>/,
    where checkpoint.load reads it."""
    saved = checkpoint.saved_state(source)
    check_origin(cfg, source, saved)  # every rank reads the same files: the same verdict, no collective
    root = checkpoint.ckpt_root(cfg)
    out = universal_dir(root, source)
    what = f"convert {source} to a universal checkpoint"
    waiting.one_rank_does(lambda: _convert_once(source, out, extra=extra), name="universal", what=what,
                          marker_dir=cfg.output_dir, timeout_minutes=cfg.dist.wait_minutes,
                          stale_minutes=cfg.dist.stale_minutes)
    return out


def _convert_once(source: str, out: str, workers: Optional[tuple[int, int]] = None, extra: Sequence[str] = ()) -> None:
    if is_current(out, source):
        dist.print0(f"resume: reusing the universal copy {out}")
        return
    shutil.rmtree(out, ignore_errors=True)
    dist.print0(f"resume: converting {source} -> {out} (a full fp32 copy; other ranks wait up to dist.wait_minutes)")
    start = time.perf_counter()
    try:
        _run_converter(source, out, workers)
        for name in extra:  # DeepSpeed's converter reads one engine's files per directory: one run each
            _run_converter(os.path.join(source, name), os.path.join(out, name), workers)
        for name in ("trainer_state.json", "rng"):  # what llmtrain itself reads from a checkpoint
            src = os.path.join(source, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(out, name))
            elif os.path.isfile(src):
                shutil.copy2(src, os.path.join(out, name))
        seconds = time.perf_counter() - start
        stamp = {"source": os.path.realpath(source), "save_id": checkpoint.saved_state(source).get("save_id"),
                 "seconds": round(seconds, 2)}
        checkpoint.write_atomic(os.path.join(out, checkpoint.COMPLETE), json.dumps(stamp))
    except BaseException as e:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half copy (it is as large as the checkpoint)
        if isinstance(e, OSError):
            raise checkpoint.StorageError(f"train.resume: writing the universal copy {out} failed: {waiting.one_line(e)}; "
                                          f"{checkpoint.free_text(out)}") from None
        raise
    finally:
        for folder in (os.path.dirname(out), out):  # DeepSpeed's pointers (beside each output); we load by tag
            with_latest = os.path.join(folder, "latest_universal")
            if os.path.isfile(with_latest):
                os.remove(with_latest)
    dist.print0(f"resume: converted in {seconds:.1f} s ({checkpoint.dir_bytes(out) / 2**20:.1f} MiB written)")


MAX_CONVERTER_WORKERS = 8  # more processes mostly contend for the same disk and page cache
EXTRACT_MEMORY_FACTOR = 1.5  # an extract worker holds its whole ZeRO shard (torch.load) plus fragment copies
MERGE_MEMORY_FACTOR = 3.0  # a merge worker holds a parameter's fragments, their concatenation and a save buffer


def plan_workers(cpus: int, available_bytes: int, shard_files: int, shard_bytes: int,
                 largest_param_bytes: int) -> tuple[int, int]:
    """(extract, merge) worker counts: min(cpus, MAX_CONVERTER_WORKERS), no more extract workers than
    shard files, and no more of either than fit in `available_bytes` at their per-worker peak."""
    top = max(1, min(cpus, MAX_CONVERTER_WORKERS))
    extract = min(top, max(1, shard_files), int(available_bytes // max(1.0, EXTRACT_MEMORY_FACTOR * shard_bytes)))
    merge = min(top, int(available_bytes // max(1.0, MERGE_MEMORY_FACTOR * largest_param_bytes)))
    return max(1, extract), max(1, merge)


def _available_memory() -> int:
    """MemAvailable, or less when this process's cgroup (v2) caps it lower; 0 when unknown (one worker each)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit.isdigit():
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def _largest_param_numel(source: str) -> int:
    """The largest parameter of the checkpoint, from the param_shapes DeepSpeed stores in a model-states
    file, read memory-mapped and weights-only (the tensors are not read); 0 when unreadable (-> 1 merge worker)."""
    from .ckpt_engine import register_safe_globals

    files = sorted(f for f in os.listdir(source) if f.endswith("model_states.pt"))
    if not files:
        return 0
    register_safe_globals()
    try:
        state = torch.load(os.path.join(source, files[0]), map_location="cpu", mmap=True, weights_only=True)
        groups = state.get("param_shapes") or []
        groups = groups if isinstance(groups, list) else [groups]
        return max((math.prod(shape) for g in groups for shape in g.values()), default=0)
    except Exception:  # noqa: BLE001 - legacy (non-zip) file, refused unpickling, odd layout: be conservative
        return 0


def converter_workers(source: str) -> tuple[int, int, str]:
    """Extract and merge worker counts for DeepSpeed's converter on this machine, and why."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shards = [os.path.join(source, f) for f in os.listdir(source) if f.endswith("optim_states.pt")]
    shard_bytes = max((os.path.getsize(f) for f in shards), default=0)
    largest = _largest_param_numel(source)
    avail = _available_memory()
    if largest == 0:  # unknown: a merge worker's need cannot be bounded
        extract, _ = plan_workers(cpus, avail, len(shards), shard_bytes, 0)
        merge = 1
    else:
        extract, merge = plan_workers(cpus, avail, len(shards), shard_bytes, 4 * largest)
    why = (f"{cpus} CPUs, {avail / 2**30:.1f} GiB available, {len(shards)} shard(s) of <= {shard_bytes / 2**30:.2f} GiB, "
           f"largest parameter {4 * largest / 2**30:.2f} GiB fp32")
    return extract, merge, why


def _run_converter(source: str, out: str, workers: Optional[tuple[int, int]] = None) -> None:
    extract, merge, why = converter_workers(source) if workers is None else (*workers, "as asked")
    dist.print0(f"resume: converter with {extract} extract + {merge} merge worker(s) ({why})")
    cmd = [sys.executable, "-m", "llmtrain.train.universal", "--input_folder", source, "--output_folder", out,
           "--num_extract_workers", str(extract), "--num_merge_workers", str(merge), "--inject_missing_state"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [_repo_root(), os.environ.get("PYTHONPATH")] if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(ERROR_PREFIX)]
    reason = lines[-1][len(ERROR_PREFIX):] if lines else (proc.stderr.strip().splitlines() or ["?"])[-1]
    full = any(s in reason for s in ("No space left", "unexpected pos", "Disk quota"))
    if full:
        raise checkpoint.StorageError(f"train.resume: converting {source} to a universal checkpoint failed: {reason}; "
                                      f"{checkpoint.free_text(out)}")
    raise ConfigError(f"train.resume: converting {source} to a universal checkpoint failed: {reason}")


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # llmtrain/train/ -> checkout


def main() -> int:
    """`python -m llmtrain.train.universal <ds_to_universal arguments>`: DeepSpeed's converter with every
    torch.load forced to weights_only=True; any failure as one `llmtrain-universal-error:` line."""
    import multiprocessing

    from .ckpt_engine import FORCE_ENV, register_safe_globals

    os.environ[FORCE_ENV] = "1"
    try:
        register_safe_globals()
        # DeepSpeed's worker pools must fork: a spawned/forkserver worker (Python 3.14's default) would not
        # inherit the allow-list registered above and would refuse every shard
        multiprocessing.set_start_method("fork", force=True)
        # imported, not run as __main__ (runpy): its worker functions must pickle by their module's name
        from deepspeed.checkpoint import ds_to_universal

        ds_to_universal.main(ds_to_universal.parse_arguments())
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - reported as one line to the parent
        print(f"{ERROR_PREFIX}{type(e).__name__}: {waiting.one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
