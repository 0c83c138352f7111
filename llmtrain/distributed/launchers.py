"""Rank/world discovery for every launcher (rendezvous.py meets the ranks; ranks.py says who is who).

Launchers describe the job in different environment variables:
  deepspeed / torchrun: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  OpenMPI (mpirun):     OMPI_COMM_WORLD_RANK / _LOCAL_RANK / _SIZE (master address via mpi4py)
  Slurm (srun):         SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST
  plain `python`:       none of them: a world of one
We normalise them all to the torch.distributed env:// variables, meet every rank at
MASTER_ADDR:MASTER_PORT (rank 0 serves a TCPStore; each rank registers its number), then hand the
process group to DeepSpeed. Anything missing or contradictory (a rank that never arrives, a rank
claimed twice, a busy master port, an unresolvable MASTER_ADDR) ends as one line per rank naming
it (LaunchError, exit status 2) within dist.timeout_minutes instead of a hang or a C++ traceback.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import ConfigError
from .ranks import launcher_rank, warn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # deepspeed/torchrun | mpi | slurm | single
    device: torch.device
    backend: str
    mesh: Optional[Any] = None  # mesh.Mesh (DP x SP x TP), set by the runner once the recipe's sizes are known

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel rank: SP/TP peers read the same rows (mesh.py)."""
        return self.mesh.dp_rank if self.mesh is not None else self.rank

    @property
    def data_world_size(self) -> int:
        """Ranks that read different rows (the data-parallel size)."""
        return self.mesh.dp if self.mesh is not None else self.world_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # no scontrol: handle the common "node[01-04],other" form by hand
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def discover_env() -> str:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from whichever launcher started us; return its name."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return "deepspeed/torchrun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpi"  # DeepSpeed's mpi discovery (mpi4py) fills the rest, master address included
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or "1")
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise fail(f"rank {env['RANK']}: Slurm step without SLURM_JOB_NODELIST or MASTER_ADDR; run under srun "
                           "inside an allocation (launch/slurm/train.sbatch) or export MASTER_ADDR")
            env["MASTER_ADDR"] = _first_slurm_host(nodelist)
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "1").isdigit() and int(env["SLURM_NTASKS"]) > 1:
        # the batch script itself (no SLURM_STEP_ID): the other tasks were never started
        warn(f"Slurm job {env['SLURM_JOB_ID']} has SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not "
             "started by srun: running as a single rank; start the ranks with srun (launch/slurm/train.sbatch)")
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def die_with_launcher() -> bool:
    """Under torchrun or the deepspeed launcher, SIGKILL this rank when the launcher process dies.

    torchrun starts each worker in a session of its own, and the deepspeed launcher kills its workers
    only from a signal handler, so a launcher that is itself SIGKILLed (OOM killer, `kill -9`, a
    node agent) leaves orphaned ranks that keep training and writing checkpoints into output_dir
    while the resubmitted job starts beside them. Linux's PR_SET_PDEATHSIG ends them with the
    launcher, as if the whole job had crashed (checkpoints are crash-safe: see checkpoint.py).
    mpirun (orted) and srun (cgroups) already clean up their ranks. Returns whether it was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    if "TORCHELASTIC_RUN_ID" not in os.environ and "CROSS_RANK" not in os.environ:
        return False  # not a child of torchrun / deepspeed.launcher.launch (e.g. RANK set by hand)
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the call above: nobody will signal us
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _local_world_size() -> int:
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0]
        if value.isdigit():
            return int(value)
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_cpu_threads(local_world_size: int) -> None:
    """Give each rank its share of the cores: torch otherwise uses every core in every
    process, and ranks on one machine fight for them (slow and jittery)."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


class LaunchError(ConfigError):
    """The launch environment is incomplete or contradictory: one line naming what is missing (exit status 2)."""


def fail(message: str) -> LaunchError:
    """A LaunchError that every rank reports: runner.main prints rank 0's line, so the other
    ranks print theirs here; each line names its rank and host."""
    if launcher_rank() != 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return LaunchError(message)
