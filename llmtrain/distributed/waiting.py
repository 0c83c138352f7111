"""One rank does a long piece of file work; the other ranks wait for it outside any collective.

Why not a barrier: a collective waits at most `dist.timeout_minutes` (sized for a training step,
30 min by default), and when the working rank fails the waiting ranks learn nothing but a timeout
or a torn connection: a 30-minute hang, then a traceback per rank. Here the waiting ranks poll a
marker file that the working rank writes when it is done, or that carries its one-line error when
it failed, with a timeout of their own (`dist.wait_minutes`: a checkpoint conversion of a 70B model
or the tokenization of millions of rows takes hours) and a progress line saying what they wait for.

    result = one_rank_does(work, name="universal", what="convert step_00000100 to a universal checkpoint",
                           marker_dir=ckpt_root, timeout_minutes=cfg.dist.wait_minutes)

Every rank must call it at the same point (the working rank hands out a fresh token with one
broadcast, which returns at once because nobody has started working yet). It returns work()'s
result on the working rank and None on the others; an exception on the working rank propagates
there and becomes `OtherRankFailed` (with the same exit status, its line printed by the working
rank) on the others.

Used for the universal-checkpoint conversion, the final/ export with the LoRA merge, and the
removal of a partial checkpoint; data preparation can wait the same way.

Requirements and limits: `marker_dir` must be visible to every rank (output_dir on shared
storage, as checkpoints already require). A working rank that dies without a word (SIGKILL, OOM
killer) writes no marker: every supported launcher (torchrun, deepspeed, mpirun, srun
--kill-on-bad-exit as in launch/slurm/train.sbatch) then ends the other ranks; failing that they
stop at the timeout. On NFS a new file can take up to the attribute-cache time (~60 s) to appear.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any, Callable, Optional

from ..errors import ConfigError, LlmtrainError
from . import ranks as dist

MARKERS = ".llmtrain-wait"  # subdirectory of marker_dir holding <name>-<token>.done / .failed


class OtherRankFailed(LlmtrainError, RuntimeError):
    """The working rank failed (and printed its one-line error): this rank ends with the same status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WaitTimeout(ConfigError):
    """Nothing came from the working rank within the wait timeout: one line (exit status 2)."""


def exit_code_of(e: BaseException) -> int:
    """The exit status a command gives `e`: an LlmtrainError's `exit_code` (errors.py), 1 for anything else."""
    return e.exit_code if isinstance(e, LlmtrainError) else 1


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:500]


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _purge_old(folder: str, name: str, token: str) -> None:
    """Markers of earlier calls under `name`: every rank left those waits before this call's broadcast."""
    try:
        for entry in os.listdir(folder):
            if entry.startswith(f"{name}-") and token not in entry:
                os.remove(os.path.join(folder, entry))
    except OSError:
        pass  # leftovers are harmless: their tokens never match again


def one_rank_does(work: Callable[[], Any], *, name: str, what: str, marker_dir: str, timeout_minutes: float,
                  worker: int = 0, progress_minutes: float = 10.0) -> Optional[Any]:
    """Run work() on rank `worker` while the other ranks poll for its marker (see the module doc).

    name: marker prefix (one per call site); what: says in messages what the waiting ranks wait for."""
    world = dist.world_size()
    if world == 1:
        return work()
    import torch.distributed as tdist

    rank = tdist.get_rank()
    token = dist.broadcast_object(uuid.uuid4().hex if rank == worker else None, src=worker)
    folder = os.path.join(marker_dir, MARKERS)
    done, failed = (os.path.join(folder, f"{name}-{token}.{kind}") for kind in ("done", "failed"))
    if rank != worker:
        _wait(done, failed, rank=rank, worker=worker, what=what, timeout_minutes=timeout_minutes,
              progress_minutes=progress_minutes, announce=rank == (1 if worker == 0 else 0))
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        _purge_old(folder, name, token)
        result = work()
    except BaseException as e:
        _report(failed, {"message": one_line(e), "exit_code": exit_code_of(e), "rank": rank, "host": dist.host_name()})
        raise
    _report(done, {"rank": rank})
    return result


def _report(path: str, payload: dict) -> None:
    """Write the marker the waiting ranks poll for. If even that fails (a disk full to the last
    byte), warn: this rank is about to exit and the launcher ends the waiting ranks."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, json.dumps(payload))
    except OSError as e:
        dist.warn(f"could not write {path} for the waiting ranks ({one_line(e)}); they stop when the launcher "
                  "ends them, or after dist.wait_minutes")


def _wait(done: str, failed: str, *, rank: int, worker: int, what: str, timeout_minutes: float,
          progress_minutes: float, announce: bool) -> None:
    """Poll for done/failed, backing off from 0.2 s to 5 s (a stat per poll, cheap even on a shared filesystem)."""
    start = time.monotonic()
    deadline, next_note, delay = start + timeout_minutes * 60, start + progress_minutes * 60, 0.2
    while True:
        if os.path.exists(failed):
            try:
                with open(failed) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            raise OtherRankFailed(f"rank {worker} failed to {what}: {info.get('message', '?')}",
                                  int(info.get("exit_code", 1)))
        if os.path.exists(done):
            return
        now = time.monotonic()
        if now >= deadline:
            raise WaitTimeout(
                f"rank {rank} (host {dist.host_name()}): waited {timeout_minutes:g} min for rank {worker} to {what}, "
                f"and no marker appeared in {os.path.dirname(done)}; rank {worker} died or is still working "
                "(see its log); raise dist.wait_minutes if it only needs longer, and check that this directory "
                "is on storage every rank sees")
        if announce and now >= next_note:  # one waiting rank speaks for all
            print(f"[rank {rank}] waiting for rank {worker} to {what} ({(now - start) / 60:.0f} of up to "
                  f"{timeout_minutes:g} min, dist.wait_minutes)", file=sys.stderr, flush=True)
            next_note = now + progress_minutes * 60
        time.sleep(min(delay, max(deadline - now, 0.01)))
        delay = min(delay * 1.5, 5.0)
