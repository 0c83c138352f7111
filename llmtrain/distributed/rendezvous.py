"""Rank/world discovery for every launcher, device and backend choice, rank-0 helpers.

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

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .config import ConfigError


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


def fail(message: str) -> LaunchError:
    """A LaunchError that every rank reports: runner.main prints rank 0's line, so the other
    ranks print theirs here; each line names its rank and host."""
    if launcher_rank() != 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return LaunchError(message)


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


def shutdown() -> None:
    """Wait for every rank, then tear the process group down."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if dist.get_world_size() > 1:
                dist.barrier()
        except Exception:  # a rank already gone: nothing left to wait for
            pass
        dist.destroy_process_group()


def finish(code: int) -> int:
    """End a process that may have run collectives: wait for every rank, tear the group down and,
    with several ranks, leave through os._exit. Interpreter finalisation can race gloo's worker
    threads releasing tensors and abort the process (seen ~1 in 4 multi-rank runs under mpirun),
    which would turn a finished run into a crash. mpirun also needs MPI_Finalize first."""
    multi_rank = world_size() > 1
    shutdown()
    if not multi_rank:
        return code
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
