"""Ranks that wait for other ranks' file work outside any collective: polling, heartbeats, one-line errors.

Why not a barrier: a collective waits at most `dist.timeout_minutes` (sized for a training step,
30 min by default), and when the working rank fails the waiting ranks learn nothing but a timeout
or a torn connection: a 30-minute hang, then a traceback per rank. Here the waiting ranks poll a
file (a marker the working rank writes when it is done, or that carries its one-line error when it
failed) and say what they wait for.

Liveness: a working rank runs a `Heartbeat`, a daemon thread that renames its beat file every
min(30 s, dist.stale_minutes / 5). A waiting rank that sees no beat move for `dist.stale_minutes`
(10 min) stops with one line naming that rank and its host: a working rank killed without a word
(SIGKILL, the OOM killer) under a launcher that does not end the other ranks (mpirun or srun without
kill-on-bad-exit, a lost node) costs minutes, not the whole cap. The total cap (`dist.wait_minutes`
here, `data.prepare_timeout_minutes` for data preparation) then only bounds a worker that is alive
but stuck; it defaults to 24 h, 5x what a 70B universal conversion takes at the measured serial rate
(README), and 0 means none.

    result = one_rank_does(work, name="universal", what="convert step_00000100 to a universal checkpoint",
                           marker_dir=ckpt_root, timeout_minutes=cfg.dist.wait_minutes,
                           stale_minutes=cfg.dist.stale_minutes)

Every rank must call one_rank_does at the same point (the working rank hands out a fresh token with
one broadcast, which returns at once because nobody has started working yet). It returns work()'s
result on the working rank and None on the others; an exception on the working rank propagates
there and becomes `OtherRankFailed` (with the same exit status, its line printed by the working
rank) on the others. Used for the universal-checkpoint conversion and the final/ export with the
LoRA merge. Data preparation (data/coordination.py) waits through the same `poll_until`, `Heartbeat`
and `Liveness`. (Removing a partial checkpoint uses a plain barrier: see checkpoint._abandon.)

A wait that ends without its result raises a `WaitError` (one line, exit status 2) on every waiting
rank; `speaker` says which of them prints it (the rank that usually prints, rank 0, may be the dead one).

Requirements and limits: the marker directory must be visible to every rank (output_dir on shared
storage, as checkpoints already require). On NFS a new file or a renamed beat can take the
attribute-cache time (up to ~60 s) to show: keep dist.stale_minutes well above a minute. A working
rank whose main thread hangs while the process lives keeps beating: only the total cap ends that.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Optional

from ..config import DistConfig
from ..errors import ConfigError, LlmtrainError
from . import ranks as dist

MARKERS = ".llmtrain-wait"  # subdirectory of marker_dir: <name>-<token>.done / .failed, heartbeats
HEARTBEAT_S = 30.0  # most seconds between two beats of a working rank (fewer with a short stale limit)
SEP = "~"  # beat file name: <prefix>~<rank>~<host>~<beat number>
DIE_ENV = "LLMTRAIN_TEST_DIE_IN"  # test hook: the working rank of one_rank_does(name=<value>) SIGKILLs itself


class OtherRankFailed(LlmtrainError, RuntimeError):
    """The working rank failed (and printed its one-line error): this rank ends with the same status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WaitError(ConfigError):
    """A wait ended without its result: one line, exit status 2. Every waiting rank raises it; only
    the one with `speaker` set prints it (runner.main), so a job prints it once."""

    exit_code = 2

    def __init__(self, message: str, speaker: bool = True):
        super().__init__(message)
        self.speaker = speaker


class WaitTimeout(WaitError):
    """The total cap (dist.wait_minutes / data.prepare_timeout_minutes) passed: the worker is alive but not done."""


class WorkerGone(WaitError):
    """A rank being waited for stopped beating for dist.stale_minutes: it died or its node is unreachable."""


def exit_code_of(e: BaseException) -> int:
    """The exit status a command gives `e`: an LlmtrainError's `exit_code` (errors.py), 1 for anything else."""
    return e.exit_code if isinstance(e, LlmtrainError) else 1


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:500]


# --------------------------------------------------------------------------- polling


def poll_until(ready: Callable[[], Any], *, timeout_s: float, on_timeout: Callable[[], WaitError],
               check: Optional[Callable[[], None]] = None, say: Optional[Callable[[float], None]] = None,
               say_every_s: float = 600.0, first_say_s: Optional[float] = None,
               first_delay_s: float = 0.2, max_delay_s: float = 5.0) -> Any:
    """Call check() (it raises to end the wait early: a failure marker, a stale heartbeat) and ready()
    until ready() returns something truthy, which is returned. Backs off (x1.5 per look) from
    first_delay_s to max_delay_s between looks, so a long wait costs a few metadata operations per
    max_delay_s, even on a shared filesystem.
    say(elapsed_s) every say_every_s (first after first_say_s); after timeout_s (0 = never) raise on_timeout()."""
    start = time.monotonic()
    next_say = start + (say_every_s if first_say_s is None else first_say_s)
    delay = first_delay_s
    while True:
        if check is not None:
            check()
        value = ready()
        if value:
            return value
        now = time.monotonic()
        if timeout_s > 0 and now - start >= timeout_s:
            raise on_timeout()
        if say is not None and now >= next_say:
            say(now - start)
            next_say = now + say_every_s
        left = start + timeout_s - now if timeout_s > 0 else delay
        time.sleep(max(0.01, min(delay, left)))
        delay = min(delay * 1.5, max_delay_s)


# --------------------------------------------------------------------------- heartbeats


def beat_interval(stale_s: float) -> float:
    return max(0.05, min(HEARTBEAT_S, stale_s / 5))


class Heartbeat:
    """A working rank's sign of life: a daemon thread renames <folder>/<prefix>~<rank>~<host>~<n> to
    n+1 every beat_interval(stale_s). A rename, not a write: one metadata operation per beat, no data,
    and a waiter sees every rank's beat in one directory listing (no stat per rank). The beat file is
    removed on exit; a killed process leaves it, unmoving, which is what waiters detect. Beats come
    from a thread, so a main thread busy in Python, C++ or a subprocess keeps beating."""

    def __init__(self, folder: str, prefix: str, rank: int, stale_s: float):
        self.folder, self.prefix, self.rank = folder, prefix, rank
        self.host = dist.host_name().replace(SEP, "-")
        self.interval = beat_interval(stale_s)
        self.beat = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _path(self, beat: int) -> str:
        return os.path.join(self.folder, SEP.join((self.prefix, str(self.rank), self.host, str(beat))))

    def __enter__(self) -> "Heartbeat":
        os.makedirs(self.folder, exist_ok=True)
        open(self._path(0), "w").close()
        self._thread = threading.Thread(target=self._run, name=f"llmtrain-heartbeat-{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.replace(self._path(self.beat), self._path(self.beat + 1))
            except FileNotFoundError:  # removed under us (an old-token purge): start a new one
                try:
                    open(self._path(self.beat + 1), "w").close()
                except OSError:
                    continue
            except OSError:
                continue  # e.g. a transient NFS error: the next beat tries again
            self.beat += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            os.remove(self._path(self.beat))
        except OSError:
            pass


def _parse_beat(name: str, prefix: str):
    if not name.startswith(prefix + SEP):
        return None
    parts = name[len(prefix) + 1:].split(SEP)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[0]), parts[1], int(parts[2])


class Liveness:
    """The waiters' view of the beats under `prefix` in `folder`: one listdir per look.

    A rank counts as gone when its beat has not moved for stale_s on this rank's own clock (no clock
    is compared across hosts). Ranks in `expect` are watched from the start even before their first
    beat; any other rank from its first beat until its beat file is removed (it finished)."""

    def __init__(self, folder: str, prefix: str, stale_s: float, expect: Iterable[int] = ()):
        self.folder, self.prefix, self.stale_s = folder, prefix, stale_s
        self.expect = set(expect)
        now = time.monotonic()
        self.seen: dict[int, list] = {r: [None, "?", now] for r in self.expect}  # rank -> [beat, host, since]

    def look(self) -> None:
        now = time.monotonic()
        try:
            names = os.listdir(self.folder)
        except OSError:
            names = []
        current = {}
        for name in names:
            parsed = _parse_beat(name, self.prefix)
            if parsed is not None:
                current[parsed[0]] = parsed[1:]
        for rank, (host, beat) in current.items():
            rec = self.seen.get(rank)
            if rec is None or rec[0] != beat:
                self.seen[rank] = [beat, host, now]
        for rank in [r for r in self.seen if r not in current and r not in self.expect]:
            del self.seen[rank]  # its beat file is gone: it finished

    def gone(self) -> list[tuple[int, str, float]]:
        """(rank, host, seconds without a beat) of every watched rank silent for longer than stale_s."""
        now = time.monotonic()
        return sorted((r, host, now - since) for r, (_, host, since) in self.seen.items() if now - since > self.stale_s)

    def speaker(self, rank: int) -> bool:
        """Whether this rank prints a wait error: the lowest watched rank that still beats (or this rank)."""
        dead = {r for r, _, _ in self.gone()}
        return rank == min([r for r in self.seen if r not in dead] + [rank])

    def check(self, rank: int, doing: str, speaker: Optional[bool] = None) -> None:
        """Raise WorkerGone (one line) when a watched rank stopped beating while it was to `doing`."""
        self.look()
        gone = self.gone()
        if not gone:
            return
        r, host, silent_s = gone[0]
        more = f" (and {len(gone) - 1} more rank(s))" if len(gone) > 1 else ""
        seen = "its heartbeat" if self.seen[r][0] is not None else "no heartbeat ever appeared; its beat"
        raise WorkerGone(
            f"rank {rank} (host {dist.host_name()}): rank {r} (host {host}){more} shows no sign of life: {seen} in "
            f"{self.folder} has not moved for {silent_s:.0f} s (dist.stale_minutes={self.stale_s / 60:g}) while rank "
            f"{rank} waited for it to {doing}; it died (the OOM killer? see its log on {host}) or its node is unreachable",
            speaker=self.speaker(rank) if speaker is None else speaker)


# --------------------------------------------------------------------------- one rank works, the others wait


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _purge_old(folder: str, name: str, token: str) -> None:
    """Markers and beats of earlier calls under `name`: every rank left those waits before this call's broadcast."""
    try:
        for entry in os.listdir(folder):
            if entry.startswith(f"{name}-") and token not in entry:
                os.remove(os.path.join(folder, entry))
    except OSError:
        pass  # leftovers are harmless: their tokens never match again


def _test_die(name: str) -> None:
    if os.environ.get(DIE_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no marker, no exception


def one_rank_does(work: Callable[[], Any], *, name: str, what: str, marker_dir: str, timeout_minutes: float,
                  stale_minutes: float = DistConfig.stale_minutes, worker: int = 0,
                  progress_minutes: float = 10.0) -> Optional[Any]:
    """Run work() on rank `worker` while the other ranks poll for its marker (see the module doc).

    name: marker prefix (one per call site); what: says in messages what the waiting ranks wait for;
    timeout_minutes: total cap (0 = none); stale_minutes: silence of the worker's heartbeat that ends the wait."""
    world = dist.world_size()
    if world == 1:
        return work()
    import torch.distributed as tdist

    rank = tdist.get_rank()
    token = dist.broadcast_object(uuid.uuid4().hex if rank == worker else None, src=worker)
    folder = os.path.join(marker_dir, MARKERS)
    done, failed = (os.path.join(folder, f"{name}-{token}.{kind}") for kind in ("done", "failed"))
    if rank != worker:
        _wait(done, failed, Liveness(folder, f"{name}-{token}", stale_minutes * 60, expect=[worker]), rank=rank,
              worker=worker, what=what, timeout_minutes=timeout_minutes, progress_minutes=progress_minutes,
              speaker=rank == (1 if worker == 0 else 0))
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        _purge_old(folder, name, token)
        with Heartbeat(folder, f"{name}-{token}", rank, stale_minutes * 60):
            _test_die(name)
            result = work()
            _report(done, {"rank": rank})  # before the beat stops: a waiter never sees neither
    except BaseException as e:
        _report(failed, {"message": one_line(e), "exit_code": exit_code_of(e), "rank": rank, "host": dist.host_name()})
        raise
    return result


def _report(path: str, payload: dict) -> None:
    """Write the marker the waiting ranks poll for. If even that fails (a disk full to the last
    byte), warn: this rank is about to exit and the launcher ends the waiting ranks, or they stop
    when its heartbeat goes stale."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, json.dumps(payload))
    except OSError as e:
        dist.warn(f"could not write {path} for the waiting ranks ({one_line(e)}); they stop when the launcher "
                  "ends them, or after dist.stale_minutes")


def _wait(done: str, failed: str, liveness: Liveness, *, rank: int, worker: int, what: str, timeout_minutes: float,
          progress_minutes: float, speaker: bool) -> None:
    """Poll for done/failed (a stat each) and the worker's heartbeat (a listdir), backing off to 5 s."""

    def check() -> None:
        if os.path.exists(failed):
            try:
                with open(failed) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            raise OtherRankFailed(f"rank {worker} failed to {what}: {info.get('message', '?')}",
                                  int(info.get("exit_code", 1)))
        if not os.path.exists(done):
            liveness.check(rank, what, speaker=speaker)

    def timed_out() -> WaitError:
        return WaitTimeout(
            f"rank {rank} (host {dist.host_name()}): waited {timeout_minutes:g} min (dist.wait_minutes) for rank "
            f"{worker} to {what}; it is still alive (its heartbeat in {os.path.dirname(done)} moves) but not done: "
            "see its log; raise dist.wait_minutes (0 = no cap) if it only needs longer", speaker=speaker)

    def say(elapsed_s: float) -> None:
        if speaker:  # one waiting rank speaks for all
            cap = f"up to {timeout_minutes:g} min, dist.wait_minutes" if timeout_minutes > 0 else "no cap"
            print(f"[rank {rank}] waiting for rank {worker} to {what} ({elapsed_s / 60:.0f} min of {cap})",
                  file=sys.stderr, flush=True)

    poll_until(lambda: os.path.exists(done), timeout_s=timeout_minutes * 60, on_timeout=timed_out, check=check,
               say=say, say_every_s=progress_minutes * 60)
