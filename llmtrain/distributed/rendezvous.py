"""Meet every rank at MASTER_ADDR:MASTER_PORT, start torch.distributed and DeepSpeed, and end cleanly.

`init()` turns whichever launcher started us (launchers.discover_env) into a process group within
dist.timeout_minutes, or one line per rank naming what is missing (LaunchError, exit status 2);
`finish()` tears it down without the interpreter-shutdown races of gloo and MPI.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch

from .launchers import DistInfo, _free_port, _local_world_size, die_with_launcher, discover_env, fail, set_cpu_threads
from .ranks import host_name, world_size

def _port_free(port: int) -> bool:
    """Could a server listen on `port` here? SO_REUSEADDR as TCPStore sets it, so a port left in
    TIME_WAIT by an earlier run counts as free; only a live listener makes it busy."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _world_source(launcher: str) -> str:
    """Where the world size came from, for error messages."""
    env = os.environ
    if launcher == "slurm":
        return f"SLURM_NTASKS={env.get('SLURM_NTASKS')}"
    if launcher == "mpi":
        return f"mpirun -np {env.get('OMPI_COMM_WORLD_SIZE') or env.get('PMI_SIZE') or env.get('WORLD_SIZE')}"
    return f"WORLD_SIZE={env.get('WORLD_SIZE')}"


def _ranks_text(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return shown + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def _check_env(launcher: str) -> tuple[int, int, str, int]:
    """Fast checks before any waiting: ranks in range, MASTER_ADDR resolvable, master port free."""
    env = os.environ
    try:
        rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
        addr = env["MASTER_ADDR"]
    except (KeyError, ValueError) as e:
        raise fail(f"{launcher} launch: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT incomplete or not numbers ({e}); "
                   f"start through a launcher (deepspeed, torchrun, mpirun, srun) or set all four") from None
    where = f"rank {rank} (host {host_name()})"
    if not 0 <= rank < world:
        raise fail(f"{where}: rank {rank} is outside the world of {world} ranks ({_world_source(launcher)}); "
                   "the launch environment contradicts itself")
    try:
        socket.getaddrinfo(addr, port)
    except OSError as e:
        raise fail(f"{where}: MASTER_ADDR={addr} does not resolve ({e.strerror or e}); set it to rank 0's host name or IP") from None
    if rank == 0 and not _agent_store() and not _port_free(port):
        if launcher == "single":  # nobody else needs to find a single process: take any free port
            env["MASTER_PORT"] = str(_free_port())
            return rank, world, addr, int(env["MASTER_PORT"])
        raise fail(f"{where}: MASTER_PORT={port} is already in use on this host (another job or a leftover process "
                   "listens there); choose a free port (MASTER_PORT, --master_port)")
    return rank, world, addr, port


def _agent_store() -> bool:
    """torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT: every rank is its client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _rendezvous(launcher: str, timeout: datetime.timedelta):
    """Meet every rank at MASTER_ADDR:MASTER_PORT within `timeout`, or fail with one line naming who is missing.

    Rank 0 serves a TCPStore (torchrun: its agent does); each rank registers under its rank number, so
    rank 0 can name the ranks that never came and a rank number claimed twice."""
    from torch.distributed import PrefixStore, TCPStore

    rank, world, addr, port = _check_env(launcher)
    where, at, minutes = f"rank {rank} (host {host_name()})", f"{addr}:{port}", f"{timeout.total_seconds() / 60:g} min"
    try:
        store = TCPStore(addr, port, world_size=world, is_master=rank == 0 and not _agent_store(), timeout=timeout,
                         wait_for_workers=False)
    except Exception as e:  # DistNetworkError: bind failed (master) or connect timed out (others)
        if rank == 0 and not _agent_store():
            raise fail(f"{where}: cannot serve the rendezvous on MASTER_PORT={port}: {_one_line(e)}") from None
        raise fail(f"{where}: could not reach rank 0 at MASTER_ADDR:MASTER_PORT={at} within {minutes}; is rank 0 running "
                   "with the same MASTER_ADDR/MASTER_PORT, and the port open between the nodes?") from None
    prefix = f"llmtrain/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = PrefixStore(prefix, store)
    me = f"{host_name()}|{os.getpid()}|{world}"
    holder = store.compare_set(f"arrived/{rank}", "", me).decode()
    if holder != me:
        raise fail(f"{where}: rank {rank} was already claimed by host {holder.split('|')[0]} (pid {holder.split('|')[1]}); "
                   "two processes got the same rank: the launch environment contradicts itself")
    arrived = store.add("count", 1)
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        while arrived < world and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add("count", 0)
        keys = [f"arrived/{r}" for r in range(world)]
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        others = [] if missing else [v.decode().split("|") for v in store.multi_get(keys)]
        bad_world = [f"rank {r} (host {h}) has world size {w}" for r, (h, _, w) in enumerate(others) if int(w) != world]
        store.set("verdict", ",".join(map(str, missing)) if missing else ("world" if bad_world else "ok"))
        if missing:
            time.sleep(1.0)  # the store lives in this process: let the waiting ranks read the verdict first
            raise fail(f"{where}: only {world - len(missing)} of {world} ranks ({_world_source(launcher)}) arrived at "
                       f"{at} within {minutes}; missing rank(s) {_ranks_text(missing)}; check that every task/node "
                       "was started and got the same MASTER_ADDR/MASTER_PORT")
        if bad_world:
            time.sleep(1.0)
            raise fail(f"{where}: world size {world} ({_world_source(launcher)}) but {'; '.join(bad_world)}")
    else:
        try:
            store.wait(["verdict"], max(datetime.timedelta(seconds=1), timeout))
            verdict = store.get("verdict").decode()
        except Exception:
            verdict = "unknown"
        if verdict != "ok":
            detail = {"unknown": "rank 0 did not confirm that every rank arrived (see rank 0's error)",
                      "world": "the ranks disagree on the world size (see rank 0's error)"}
            raise fail(f"{where}: rendezvous at {at} failed: "
                       + detail.get(verdict, f"rank(s) {verdict} of {world} never arrived ({_world_source(launcher)})"))
    return store, rank, world


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def init(timeout_minutes: float = 30.0, backend: str = "auto") -> DistInfo:
    """Discover ranks, pick device/backend, meet every rank (with a timeout and a one-line error naming
    the missing ranks), initialise torch.distributed and hand it to DeepSpeed."""
    launcher = discover_env()
    die_with_launcher()
    if torch.cuda.is_available():
        device_kind, default_backend = "cuda", "nccl"
    else:
        # DeepSpeed picks its accelerator from this; without it a CPU box may probe for others
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device_kind, default_backend = "cpu", "gloo"
    backend = default_backend if backend == "auto" else backend
    timeout = datetime.timedelta(minutes=timeout_minutes)

    import deepspeed  # late: DS_ACCELERATOR must be set before its first import
    import torch.distributed as tdist

    if launcher == "mpi":
        from deepspeed.comm.comm import mpi_discovery

        # fills RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR (rank 0's IP); MASTER_PORT from `mpirun -x MASTER_PORT`
        mpi_discovery(distributed_port=int(os.environ.get("MASTER_PORT", "29500")), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        store, rank, world = _rendezvous(launcher, timeout)
        kwargs = {}
        if device_kind == "cuda" and world > 1:
            kwargs["device_id"] = torch.device("cuda", local_rank)  # eager NCCL init, as DeepSpeed does
        try:
            tdist.init_process_group(backend, store=tdist.PrefixStore("pg", store), rank=rank, world_size=world,
                                     timeout=timeout, **kwargs)
        except Exception as e:
            raise fail(f"rank {rank} (host {host_name()}): {backend} process group failed to start after every rank "
                       f"arrived: {_one_line(e)}") from None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)

    rank, world = tdist.get_rank(), tdist.get_world_size()
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    local_world = _local_world_size()
    if device_kind == "cpu":
        set_cpu_threads(local_world)
    return DistInfo(rank, local_rank, world, local_world, launcher, device, backend)


def shutdown(wait_for_peers: bool = True) -> None:
    """Wait for every rank (unless a peer is known to be gone or busy), then tear the process group down."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if dist.get_world_size() > 1 and wait_for_peers:
                dist.barrier()
        except Exception:  # a rank already gone: nothing left to wait for
            pass
        dist.destroy_process_group()


def finish(code: int, wait_for_peers: bool = True) -> int:
    """End a process that may have run collectives: wait for every rank (not after a failed wait for a
    rank that died or is still working: that barrier would last dist.timeout_minutes), tear the group down and,
    with several ranks, leave through os._exit. Interpreter finalisation can race gloo's worker
    threads releasing tensors and abort the process (seen ~1 in 4 multi-rank runs under mpirun),
    which would turn a finished run into a crash. mpirun also needs MPI_Finalize first."""
    multi_rank = world_size() > 1
    shutdown(wait_for_peers)
    if not multi_rank:
        return code
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
