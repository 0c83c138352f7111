"""Writing files that other processes (other ranks, other jobs, other nodes) read while they appear.

Two ways to put a finished file in place, both after an fsync (so a rename never publishes blocks
that a crash of the node would lose):
  replace_atomic  the new file replaces any old one (readers see the old or the new, never half)
  publish_once    the first finished copy wins and is never replaced: another process may have it
                  open (on NFS, replacing it would give that reader ESTALE on its next read)
Temporary names carry host and pid, so writers on several nodes never share one, and a leftover
can be attributed to its (maybe dead) owner.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

TMP_MARK = ".tmp-"
OTHER_HOST_TMP_STALE_S = 6 * 3600.0  # a temporary file of another node untouched this long is a crash leftover


def tmp_suffix() -> str:
    return f"{TMP_MARK}{socket.gethostname()}-{os.getpid()}"


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(tmp: str, path: str) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)


def publish_once(tmp: str, path: str) -> bool:
    """Move finished `tmp` to `path` unless `path` exists; True when ours is the one in place.
    A hard link is the atomic "create if absent" that NFS and Lustre honour; where links are not
    supported, a rename after an existence check (a narrow race, still never a partial file)."""
    fsync_path(tmp)
    try:
        os.link(tmp, path)
        won = True
    except FileExistsError:
        won = False
    except OSError:  # no hard links on this file system
        won = not os.path.exists(path)
        if won:
            os.replace(tmp, path)
            return True
    os.remove(tmp)
    return won


def write_json_atomic(path: str, obj) -> None:
    import json

    tmp = path + tmp_suffix()
    with open(tmp, "w") as f:
        json.dump(obj, f)
    replace_atomic(tmp, path)  # readers see the old file or the new one, never half of one


def read_json(path: str) -> Optional[dict]:
    """The JSON in `path`, or None when it is missing or not (yet) valid JSON: the readers of files
    that other processes publish (claims, chunk sidecars, manifests) treat both as "not there"."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def publish_json_once(path: str, obj) -> bool:
    import json

    tmp = path + tmp_suffix()
    with open(tmp, "w") as f:
        json.dump(obj, f)
    return publish_once(tmp, path)


def cleanup_tmp(directory: str, other_host_stale_s: float = OTHER_HOST_TMP_STALE_S) -> None:
    """Temporary files of dead writers go: this host's by pid, other hosts' once untouched for
    `other_host_stale_s` (their pids cannot be checked from here); live writers' stay."""
    host, now = socket.gethostname(), time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for f in names:
        if TMP_MARK not in f:
            continue
        path = os.path.join(directory, f)
        h, _, pid = f.rsplit(TMP_MARK, 1)[1].rpartition("-")
        try:
            if h == host and pid.isdigit():
                if not pid_alive(int(pid)):
                    os.remove(path)
            elif now - os.stat(path).st_mtime > other_host_stale_s:
                os.remove(path)
        except OSError:  # removed by another cleaner meanwhile
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
