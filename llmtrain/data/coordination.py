"""Coordination of ranks that prepare data together, without collectives.

A counter in the rendezvous store hands out work items once each; a storage id tells which ranks
see the same files; `wait_for` polls for a file another rank writes, through llmtrain.distributed.waiting's
polling (backoff to 5 s, the WaitError family of one-line errors) with the preparation's own cap
(data.prepare_timeout_minutes) and a message saying what it waits for; with a `Liveness` it also
fails, within dist.stale_minutes, when a rank that holds work stopped beating (waiting.Heartbeat).
"""
from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import Callable, Optional

from ..distributed import waiting

STORAGE_ID_NAME = "storage-id"
POLL_S = 0.05  # first poll interval of a waiting rank; it grows by half each poll up to max_poll_s
MAX_POLL_S = 2.0  # (backoff: quick when the wait is short, a few stats per second at most when it is long)
SAY_EVERY_S = 60.0  # how often a waiting rank says what it waits for


def default_store():
    """The rendezvous store of torch.distributed (None in a single process). Private API, but the
    only handle on it: its atomic `add` gives every rank distinct chunk numbers without a collective."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() < 2:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


class ChunkCounter:
    """Hands out 0, 1, 2, ... once each to the processes of one launch that share `name`."""

    def __init__(self, name: str, store=None):
        self.name, self.store, self._local = name, store, {}

    def draw(self, what: str = "chunk") -> int:
        if self.store is None:
            self._local[what] = self._local.get(what, -1) + 1
            return self._local[what]
        try:
            return int(self.store.add(f"{self.name}/{what}", 1)) - 1
        except (RuntimeError, OSError) as e:  # DistNetworkError/DistStoreError: the store's process is gone
            raise _store_gone(e) from None

    def launch_token(self) -> str:
        """An id every process of this launch agrees on (the first to ask sets it)."""
        mine = uuid.uuid4().hex
        if self.store is None:
            return self._local.setdefault("token", mine)
        return self.store.compare_set("llmtrain-prepare/launch", "", mine).decode()


def _store_gone(e: BaseException) -> waiting.WorkerGone:
    """The rendezvous store lives in rank 0's process (torchrun: in its agent): when it stops answering,
    rank 0 (or its node) is gone; rank 1 speaks for the others."""
    import torch.distributed as tdist

    rank = tdist.get_rank() if tdist.is_initialized() else -1
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return waiting.WorkerGone(f"rank {rank} (host {socket.gethostname()}): the rendezvous store at {where} (served by "
                              f"rank 0's process) stopped answering while preparing data ({waiting.one_line(e)[:200]}); "
                              "rank 0 died (see its log) or its node is unreachable", speaker=rank == 1)


def storage_id(directory: str) -> str:
    """A random id created once per copy of `directory`: ranks that see the same files share it,
    so with node-local paths each node gets its own chunk counter (and prepares everything)."""
    path = os.path.join(directory, STORAGE_ID_NAME)
    if not os.path.exists(path):
        tmp = path + f".{socket.gethostname()}-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(uuid.uuid4().hex)
        try:
            os.link(tmp, path)  # atomic, fails if another process made it first
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: keep ours unless someone was faster
            if not os.path.exists(path):
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with open(path) as f:
        return f.read().strip()


def wait_for(ready: Callable[[], object], what: Callable[[], str], timeout_s: float, fail: Callable[[], None],
             rank: int, liveness: Optional[waiting.Liveness] = None, doing: str = "prepare data",
             max_poll_s: float = MAX_POLL_S) -> object:
    """Poll `ready()` until it returns something truthy; call `fail()` (which raises when the wait must
    end early, e.g. another rank failed) and check `liveness` (WorkerGone naming a rank that stopped
    beating while it was to `doing`) each poll; every SAY_EVERY_S say `what()`.

    Not a collective: it waits up to data.prepare_timeout_minutes (timeout_s; 0 = no cap), independent
    of dist.timeout_minutes; the speaker of a timeout is the lowest rank that still beats."""

    def check() -> None:
        fail()
        if liveness is not None:
            liveness.check(rank, doing)

    def timed_out() -> waiting.WaitError:
        return waiting.WaitTimeout(
            f"rank {rank}: gave up after {timeout_s / 60:g} min (data.prepare_timeout_minutes) waiting for {what()}; "
            "the ranks preparing it are alive (their heartbeats move): raise data.prepare_timeout_minutes "
            "(0 = no cap) if preparation is just slow", speaker=liveness.speaker(rank) if liveness else rank == 0)

    def progress(elapsed_s: float) -> None:
        cap = f"{timeout_s / 60:g} min" if timeout_s > 0 else "no cap"
        say(rank, f"waiting for {what()} ({elapsed_s / 60:.1f} min of {cap}, data.prepare_timeout_minutes)")

    # first word after 2 s: short waits stay quiet
    return waiting.poll_until(ready, timeout_s=timeout_s, on_timeout=timed_out, check=check, say=progress,
                              say_every_s=SAY_EVERY_S, first_say_s=2.0,
                              first_delay_s=POLL_S, max_delay_s=max_poll_s)


def say(rank: int, message: str) -> None:
    print(f"{'' if rank == 0 else f'[rank {rank}] '}[prepare] {message}", file=sys.stderr if rank else sys.stdout,
          flush=True)


def cleanup_tmp(directory: str) -> None:
    """Temporary files of dead writers (see files.cleanup_tmp: other nodes' too, once stale)."""
    from .files import cleanup_tmp as cleanup

    cleanup(directory)
