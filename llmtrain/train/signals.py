"""Preemption: SIGTERM/SIGUSR1 ask for a checkpoint at the next step boundary, then a non-zero exit.

Slurm sends SIGUSR1 (with `#SBATCH --signal=USR1@120`) or SIGTERM before it kills or requeues a
job. The handler only sets a flag; the loop all-reduces it once per step so every rank stops at
the same step (one rank stopping alone would leave the others hanging in a collective).
"""
from __future__ import annotations

import os
import signal
import subprocess

import torch

from .. import distributed as dist
from ..errors import LlmtrainError

PREEMPTED_EXIT_CODE = 3  # "checkpointed and stopped": a wrapper script may resubmit on it


class Preempted(LlmtrainError):
    """Checkpointed at a step boundary after a signal; the run resumes with train.resume=auto."""

    exit_code = PREEMPTED_EXIT_CODE


class StopFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._handler)
        # the flag travels on a CPU (gloo) group: checking it every step must not sync the GPU stream
        import torch.distributed as tdist

        self.group = None
        if tdist.is_initialized() and tdist.get_world_size() > 1 and tdist.get_backend() != "gloo":
            self.group = tdist.new_group(backend="gloo")  # collective: every rank creates it here

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank got a signal (one tiny CPU all-reduce per step)."""
        import torch.distributed as tdist

        flag = torch.tensor(1.0 if self.received is not None else 0.0)
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.SUM, group=self.group)
        return bool(flag.item() > 0)


def requeue_slurm_job() -> None:
    """Ask Slurm to requeue this job (needs #SBATCH --requeue); the requeued job resumes via train.resume=auto."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        dist.warn("train.requeue_on_signal is set but this is not a Slurm job; not requeued")
        return
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        dist.warn(f"scontrol requeue {job} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    else:
        dist.print0(f"requeued Slurm job {job}")
