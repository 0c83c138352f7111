"""Rank/world discovery for every launcher, device and backend choice, rank-0 helpers.

Launchers describe the job in different environment variables:
  deepspeed / torchrun: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  OpenMPI (mpirun):     OMPI_COMM_WORLD_RANK / _LOCAL_RANK / _SIZE (master address via mpi4py)
  Slurm (srun):         SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST
  plain `python`:       none of them: a world of one
We normalise them all to the torch.distributed env:// variables, then let DeepSpeed
initialise the process group with a timeout so a missing rank fails instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # deepspeed/torchrun | mpi | slurm | single
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
                raise RuntimeError("Slurm: SLURM_JOB_NODELIST is not set; run under srun inside an allocation")
            env["MASTER_ADDR"] = _first_slurm_host(nodelist)
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


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


def init(timeout_minutes: float = 30.0, backend: str = "auto") -> DistInfo:
    """Discover ranks, pick device/backend, initialise torch.distributed through DeepSpeed."""
    launcher = discover_env()
    if torch.cuda.is_available():
        device_kind, default_backend = "cuda", "nccl"
    else:
        # DeepSpeed picks its accelerator from this; without it a CPU box may probe for others
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device_kind, default_backend = "cpu", "gloo"
    backend = default_backend if backend == "auto" else backend

    import deepspeed  # late: DS_ACCELERATOR must be set before its first import

    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=(launcher == "mpi"),
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    local_world = _local_world_size()
    if device_kind == "cpu":
        set_cpu_threads(local_world)
    return DistInfo(rank, local_rank, world, local_world, launcher, device, backend)


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (all ranks when torch.distributed is not up yet)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def warn(message: str) -> None:
    """A warning every rank may print, prefixed with its rank (rank 0 unprefixed)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    prefix = "" if rank == 0 else f"[rank {rank}] "
    print(f"{prefix}warning: {message}", file=sys.stderr, flush=True)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
