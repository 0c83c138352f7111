"""Which rank this process is, rank-0 printing, and the few small collectives the library uses.

Usable before torch.distributed is up (`launcher_rank`, `is_main` read the launcher's environment)
and in a world of one (every collective is then a no-op), so callers never test `world_size > 1`.
"""
from __future__ import annotations

import os
import socket
import sys

import torch

def host_name() -> str:
    return socket.gethostname().split(".")[0]


# rank variables of each launcher, in order of trust: RANK (torchrun, deepspeed, and ours after


# init) first; SLURM_PROCID last, since mpirun inside an allocation leaves it 0 on every rank
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    """This process's global rank as its launcher announced it; usable before torch.distributed
    is up (e.g. for a config error) and under every launcher: mpirun sets no RANK until init."""
    for key in _RANK_VARS:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def is_main() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return launcher_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (before torch.distributed is up: the launcher's rank 0)."""
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


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled over the process group: small objects only)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
