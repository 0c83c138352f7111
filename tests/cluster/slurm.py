"""Helpers for tests that run real Slurm jobs on the single-node cluster of tests/cluster/slurm_up.sh.

    reason = ensure_slurm()            # None once the cluster is up, else why it cannot be (skip with it)
    rc, log = sbatch_wait("launch/slurm/train.sbatch", ["tests/cluster/echo_env.py"],
                          sbatch_args=["--ntasks-per-node=2"], timeout=60)

Jobs are submitted from the repository root (so SLURM_SUBMIT_DIR finds .venv) and run in a fresh
temporary directory unless --chdir/--output are given. Waiting polls `scontrol show job` every
0.2 s: `sbatch --wait` sleeps 2, 8, then 32 s between its own polls, which turns a 5 s job into 42 s.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_UP = Path(__file__).resolve().parent / "slurm_up.sh"
SLURM_DIR = Path(os.environ.get("LLMTRAIN_SLURM_DIR", "/tmp/llmtrain-slurm"))
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"

UP_TIMEOUT_S = 600  # slurm_up.sh may apt-get install slurm-wlm first (minutes on a fresh machine)
POLL_INTERVAL_S = 0.2  # seconds between job-state polls
# Job states after which a job will not run again (REQUEUED / PENDING / RUNNING are not among them).
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
}

_NOT_TRIED = "not tried"
_up_reason: str | None = _NOT_TRIED  # ensure_slurm's answer, cached per process


class SlurmJobTimeout(TimeoutError):
    """A job did not finish in time; it has been cancelled. `.log` holds its output so far."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n--- job output so far ---\n{log}")
        self.log = log


def slurm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus SLURM_CONF pointing at the test cluster, plus `extra`."""
    env = dict(os.environ)
    env["SLURM_CONF"] = str(SLURM_CONF)
    if extra:
        env.update(extra)
    return env


def ensure_slurm() -> str | None:
    """Start the test cluster if needed; return None when it is up, else the reason to skip.

    LLMTRAIN_SKIP_SLURM=1 skips without trying; LLMTRAIN_REQUIRE_SLURM=1 turns every reason into
    a RuntimeError (for CI machines that are meant to run these tests).
    """
    global _up_reason
    if _up_reason is _NOT_TRIED:
        _up_reason = _start_cluster()
        if _up_reason is None:
            os.environ["SLURM_CONF"] = str(SLURM_CONF)  # so plain `sinfo`/`sbatch` in other tests work
    reason = _up_reason
    if reason is not None and os.environ.get("LLMTRAIN_REQUIRE_SLURM") == "1":
        raise RuntimeError(f"LLMTRAIN_REQUIRE_SLURM=1 but the Slurm test cluster is unavailable: {reason}")
    return reason


def _start_cluster() -> str | None:
    if os.environ.get("LLMTRAIN_SKIP_SLURM") == "1":
        return "LLMTRAIN_SKIP_SLURM=1"
    if not sys.platform.startswith("linux"):
        return f"the Slurm test cluster needs Linux (this is {sys.platform})"
    if shutil.which("bash") is None:
        return "bash not found"
    if os.geteuid() != 0 and not SLURM_CONF.exists():
        return ("the Slurm test cluster needs root to install and start slurmctld/slurmd "
                "(run `sudo bash tests/cluster/slurm_up.sh` once, or run the tests as root)")
    try:
        proc = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=UP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"tests/cluster/slurm_up.sh did not finish within {UP_TIMEOUT_S} s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"tests/cluster/slurm_up.sh exited {proc.returncode}: {last}"
    return None


def _run(cmd: Sequence[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=kwargs.pop("env", slurm_env()), **kwargs)


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, ExitCode, StdOut, ...); {} when unknown."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if proc.returncode != 0:
        return {}
    # one line of Key=Value fields; values have no spaces except Command/WorkDir-like paths, which
    # the regex keeps whole by splitting only before the next " Key=".
    fields = re.split(r" (?=[A-Za-z:/]+=)", proc.stdout.strip())
    return dict(f.split("=", 1) for f in fields if "=" in f)


def sbatch_submit(
    script: str | os.PathLike,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    sbatch_args: Sequence[str] = (),
    workdir: str | os.PathLike | None = None,
) -> tuple[str, Path]:
    """Submit `script args...` from the repository root; return (job id, path of its output file).

    Without --chdir / --output in `sbatch_args`, the job runs in `workdir` (a new temporary
    directory when None) and writes `<workdir>/slurm-<jobid>.out`.
    """
    sbatch_args = list(sbatch_args)
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="llmtrain-slurm-job-")
    if not any(a.startswith(("--chdir", "-D")) for a in sbatch_args):
        sbatch_args.append(f"--chdir={workdir}")
    if not any(a.startswith(("--output", "-o")) for a in sbatch_args):
        sbatch_args.append(f"--output={Path(workdir) / 'slurm-%j.out'}")
    cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *map(str, args)]
    proc = _run(cmd, cwd=REPO_ROOT, env=slurm_env(env))
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    stdout_path = job_info(job_id).get("StdOut", "")
    return job_id, Path(stdout_path.replace("%j", job_id))


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_job(job_id: str, timeout: float, log_path: Path | None = None) -> int:
    """Poll until the job ends; return its exit status (128+N when killed by signal N).

    On timeout the job is cancelled and SlurmJobTimeout raised with its output so far.
    """
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if state in TERMINAL_STATES:
            code, _, sig = info.get("ExitCode", "0:0").partition(":")
            # the batch step's output is flushed by slurmstepd before the job is marked done
            return 128 + int(sig) if int(sig or 0) else int(code)
        if not info:
            raise RuntimeError(f"job {job_id} vanished from slurmctld (MinJobAge too short?)")
        time.sleep(POLL_INTERVAL_S)
    _run(["scancel", "--full", str(job_id)])
    log = read_log(log_path) if log_path else ""
    raise SlurmJobTimeout(f"Slurm job {job_id} not done after {timeout} s (state {info.get('JobState')}, "
                          f"reason {info.get('Reason')}); cancelled", log)


def sbatch_wait(
    script: str | os.PathLike,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    sbatch_args: Sequence[str] = (),
    workdir: str | os.PathLike | None = None,
) -> tuple[int, str]:
    """Submit a batch job, wait for it; return (exit status, text of its output file)."""
    job_id, log_path = sbatch_submit(script, args, env=env, sbatch_args=sbatch_args, workdir=workdir)
    rc = wait_job(job_id, timeout, log_path)
    return rc, read_log(log_path)
