"""Per-chunk claims, so that jobs sharing one data.cache_dir (a sweep) tokenize each chunk once.

Ranks of one launch draw distinct chunk numbers from their rendezvous store, but two jobs have
two stores: without claims each would tokenize every chunk. A claim is a file `<chunk>.claim`
created with O_CREAT|O_EXCL (atomic on local file systems, NFSv3+ and Lustre) holding its owner
(host, pid, launch); while the owner works, a heartbeat thread touches its claims every
HEARTBEAT_S. A claim is stale when its owner is a dead process on this host, or when nobody
touched it for STALE_S (an owner on another node that died: its pid cannot be checked from
here; comparing against the file's mtime tolerates clock skew far below STALE_S). A stale claim
is broken by renaming it away (one breaker wins) and claiming again.

Claims only avoid duplicate work: correctness never depends on them, because a chunk's files are
published first-wins (files.publish_once) and two writers of one chunk write the same bytes.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from .files import pid_alive, read_json

CLAIM_EXT = ".claim"
HEARTBEAT_S = 30.0  # how often an owner touches its claims
STALE_S = 600.0  # a claim untouched this long belongs to a dead owner (another node's, or a hung one)


class Claims:
    """The claims one rank process holds in `directory`, kept fresh by a daemon thread."""

    def __init__(self, directory: str, launch: str, heartbeat_s: float = HEARTBEAT_S):
        self.dir, self.launch = directory, launch
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "launch": launch}
        self._held: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name + CLAIM_EXT)

    def take(self, name: str) -> bool:
        """Claim chunk `name`; False when a live owner holds it. A stale claim is broken and retaken."""
        for _ in range(2):
            try:
                fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale(name):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            with self._lock:
                self._held.add(name)
            return True
        return False

    def release(self, name: str) -> None:
        """Drop a claim (the chunk is finished, or abandoned on error: another process may take it)."""
        with self._lock:
            self._held.discard(name)
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            pass

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)

    def stop(self) -> None:
        self._stop.set()
        self.release_all()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                held = list(self._held)
            for name in held:
                try:
                    os.utime(self.path(name))
                except OSError:  # broken by someone who judged us dead: they redo the chunk, we lose nothing
                    pass

    def _break_if_stale(self, name: str) -> bool:
        path = self.path(name)
        if not is_stale(path):
            return False
        try:  # rename, not remove: of several breakers exactly one succeeds
            os.rename(path, f"{path}.broken-{socket.gethostname()}-{os.getpid()}")
        except FileNotFoundError:
            return True  # released or broken meanwhile: try to take it
        os.remove(f"{path}.broken-{socket.gethostname()}-{os.getpid()}")
        return True


def owner_of(path: str) -> Optional[dict]:
    """The claim file's owner record (host, pid, ...), or None when the claim is gone or half-written."""
    return read_json(path)


def is_stale(path: str, stale_s: Optional[float] = None) -> bool:
    """A claim whose owner is a dead process of this host, or that nobody touched for stale_s."""
    stale_s = STALE_S if stale_s is None else stale_s
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return True
    owner = owner_of(path)
    if owner is None:  # being written right now (created, content not yet there), or garbage
        return time.time() - mtime > stale_s
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not pid_alive(owner["pid"]):
            return True
    return time.time() - mtime > stale_s
