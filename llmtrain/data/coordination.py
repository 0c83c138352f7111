"""Coordination of ranks that prepare data together, without collectives.

A counter in the rendezvous store hands out work items once each; a storage id tells which ranks
see the same files; `wait_for` polls for a file another rank writes, with its own timeout and a
message saying what it waits for. (A general "wait for a file one rank writes" helper is being
written on the ckpt branch; this is the minimal one preparation needs.)
"""
from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from typing import Callable

from .sources import DataError

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
        return int(self.store.add(f"{self.name}/{what}", 1)) - 1

    def launch_token(self) -> str:
        """An id every process of this launch agrees on (the first to ask sets it)."""
        mine = uuid.uuid4().hex
        if self.store is None:
            return self._local.setdefault("token", mine)
        return self.store.compare_set("llmtrain-prepare/launch", "", mine).decode()


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
             rank: int, max_poll_s: float = MAX_POLL_S) -> object:
    """Poll `ready()` until it returns something truthy; every SAY_EVERY_S say `what()`; call `fail()`
    (which raises when the wait must end early, e.g. another rank failed) each poll.

    This is deliberately not a collective: it waits as long as data.prepare_timeout_minutes says,
    independent of dist.timeout_minutes.
    """
    start = time.monotonic()
    last = start - SAY_EVERY_S + 2.0  # first word after 2 s: short waits stay quiet
    poll_s = POLL_S
    while True:
        fail()
        value = ready()
        if value:
            return value
        now = time.monotonic()
        if now - start > timeout_s:
            raise DataError(f"gave up after {timeout_s / 60:g} min (data.prepare_timeout_minutes) waiting for {what()}; "
                            "raise data.prepare_timeout_minutes if preparation is just slow")
        if now - last >= SAY_EVERY_S:
            say(rank, f"waiting for {what()} ({(now - start) / 60:.1f} of {timeout_s / 60:g} min, "
                       "data.prepare_timeout_minutes)")
            last = now
        time.sleep(poll_s)
        poll_s = min(max_poll_s, poll_s * 1.5)


def say(rank: int, message: str) -> None:
    print(f"{'' if rank == 0 else f'[rank {rank}] '}[prepare] {message}", file=sys.stderr if rank else sys.stdout,
          flush=True)


def cleanup_tmp(directory: str) -> None:
    """Temporary files of dead writers (see files.cleanup_tmp: other nodes' too, once stale)."""
    from .files import cleanup_tmp as cleanup

    cleanup(directory)
