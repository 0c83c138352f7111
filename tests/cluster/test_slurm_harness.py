"""Real Slurm jobs on the single-node test cluster (tests/cluster/slurm_up.sh), no mocks.

Skipped with the reason from ensure_slurm() where the cluster cannot be started (e.g. not root).
Every job runs in pytest's tmp_path (--chdir / --output on the sbatch command line) and is
waited for with a hard timeout; a job still running at its timeout is cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.slurm import REPO_ROOT, ensure_slurm, read_log, sbatch_submit, sbatch_wait, slurm_env, wait_job

TRAIN_SBATCH = REPO_ROOT / "launch" / "slurm" / "train.sbatch"
TRAIN_DS_SBATCH = REPO_ROOT / "launch" / "slurm" / "train_deepspeed.sbatch"
ECHO_ENV = REPO_ROOT / "tests" / "cluster" / "echo_env.py"
JOB_TIMEOUT_S = 60  # per job; every test stays under 90 s
# The templates ask for GPUs and 8 CPUs per rank; the test node has neither: override on the command line.
CPU_OVERRIDES = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:05:00"]

WAIT_SIGNAL_PY = '''\
import os, signal, sys, time
marker_dir, rank = sys.argv[1], os.environ["SLURM_PROCID"]

def on_usr1(signum, frame):
    open(os.path.join(marker_dir, f"marker-{rank}"), "w").write(str(signum))
    print(f"rank {rank} got signal {signum}", flush=True)
    sys.exit(0)

signal.signal(signal.SIGUSR1, on_usr1)
open(os.path.join(marker_dir, f"ready-{rank}"), "w").write(str(os.getpid()))  # handler installed
print(f"rank {rank} ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.1)
print(f"rank {rank} no signal within 60 s", flush=True)
sys.exit(3)
'''


@pytest.fixture(autouse=True, scope="module")
def slurm_cluster():
    # A fixture rather than import-time code: collecting the suite must not start (or apt-get install) Slurm.
    reason = ensure_slurm()
    if reason is not None:
        pytest.skip(reason)


def _json_lines(log: str) -> dict[str, list[dict]]:
    """{line prefix: [echo_env.py JSON objects]} ('' = unprefixed) over all lines of a job log."""
    rows: dict[str, list[dict]] = {}
    for line in log.splitlines():
        prefix, brace, rest = line.partition("{")
        try:
            row = json.loads(brace + rest) if brace else None
        except json.JSONDecodeError:  # e.g. DeepSpeed's "WORLD INFO DICT: {'vm': [0, 1]}"
            continue
        if isinstance(row, dict) and "argv" in row:
            rows.setdefault(prefix, []).append(row)
    return rows


def test_two_task_job_runs_both_ranks(tmp_path: Path):
    script = tmp_path / "two_tasks.sh"
    script.write_text('#!/bin/bash\nsrun bash -c \'echo "task $SLURM_PROCID of $SLURM_NTASKS"\'\n')
    rc, log = sbatch_wait(script, sbatch_args=["--ntasks=2", "--cpus-per-task=1"], timeout=JOB_TIMEOUT_S,
                          workdir=tmp_path)
    assert rc == 0, log
    assert "task 0 of 2" in log and "task 1 of 2" in log, log


def test_srun_sees_the_node():
    proc = subprocess.run(["srun", "-N1", "-n2", "hostname", "-s"], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S, env=slurm_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [os.uname().nodename.split(".")[0]] * 2


def test_train_sbatch_prefixes_nonzero_ranks_and_keeps_arguments(tmp_path: Path):
    args = ["--foo", "a b", "it's", "$HOME", "key=value with spaces"]
    rc, log = sbatch_wait(TRAIN_SBATCH, [str(ECHO_ENV), *args], timeout=JOB_TIMEOUT_S,
                          sbatch_args=[*CPU_OVERRIDES, f"--output={tmp_path}/train-%j.out"], workdir=tmp_path)
    assert rc == 0, log
    rows = _json_lines(log)
    assert set(rows) == {"", "[rank 1] "}, log  # rank 0 unprefixed, rank 1 prefixed
    (rank0,), (rank1,) = rows[""], rows["[rank 1] "]
    assert (rank0["SLURM_PROCID"], rank1["SLURM_PROCID"]) == ("0", "1")
    assert rank0["SLURM_NTASKS"] == rank1["SLURM_NTASKS"] == "2"
    assert rank0["argv"] == rank1["argv"] == args
    hostname = os.uname().nodename.split(".")[0]
    assert rank0["MASTER_ADDR"] == rank1["MASTER_ADDR"] == hostname
    assert rank0["MASTER_PORT"] == rank1["MASTER_PORT"]
    assert 20000 <= int(rank0["MASTER_PORT"]) < 40000
    assert rank0["OMP_NUM_THREADS"] == "1"  # = --cpus-per-task


def test_failing_rank_sets_job_exit_status(tmp_path: Path):
    code = "import os, sys; print('bye', flush=True); sys.exit(7 if os.environ['SLURM_PROCID'] == '1' else 0)"
    rc, log = sbatch_wait(TRAIN_SBATCH, ["-c", code], timeout=JOB_TIMEOUT_S, sbatch_args=CPU_OVERRIDES,
                          workdir=tmp_path)
    assert rc == 7, log
    assert "[rank 1] bye" in log, log


@pytest.mark.parametrize("scancel_flags", [[], ["--full"]], ids=["steps", "full"])
def test_usr1_reaches_every_rank_through_the_prefixer(tmp_path: Path, scancel_flags: list[str]):
    # `scancel --signal=USR1 <job>` signals every process of the job's steps (the sed prefixer too),
    # as --signal=USR1@120 does at the time limit; --full also signals the batch shell, which must
    # survive it. (--batch would signal only the batch shell: the ranks never see it.)
    script = tmp_path / "wait_signal.py"
    script.write_text(WAIT_SIGNAL_PY)
    job_id, log_path = sbatch_submit(TRAIN_SBATCH, [str(script), str(tmp_path)], sbatch_args=CPU_OVERRIDES,
                                     workdir=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, f"ranks not ready after 30 s:\n{read_log(log_path)}"
            time.sleep(0.1)
        subprocess.run(["scancel", *scancel_flags, "--signal=USR1", job_id], check=True, timeout=30, env=slurm_env())
        rc = wait_job(job_id, JOB_TIMEOUT_S, log_path)
    finally:
        subprocess.run(["scancel", job_id], timeout=30, env=slurm_env())
    log = read_log(log_path)
    assert (tmp_path / "marker-0").exists() and (tmp_path / "marker-1").exists(), log
    assert rc == 0, log
    # the prefixer ignored the signal and still forwarded rank 1's last line
    assert "rank 0 got signal 10" in log and "[rank 1] rank 1 got signal 10" in log, log


def test_deepspeed_sbatch_starts_one_launcher_per_node(tmp_path: Path):
    if shutil.which("deepspeed", path=str(REPO_ROOT / ".venv" / "bin")) is None and shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not installed")
    rc, log = sbatch_wait(TRAIN_DS_SBATCH, [str(ECHO_ENV), "--foo", "a b"], env={"GPUS_PER_NODE": "2"},
                          timeout=75, workdir=tmp_path,
                          sbatch_args=["--gpus-per-node=0", "--cpus-per-task=2", "--time=00:05:00"])
    assert rc == 0, log
    ranks = [row for rows in _json_lines(log).values() for row in rows]
    by_rank = {r["RANK"]: r for r in ranks}
    assert set(by_rank) == {"0", "1"}, log
    for rank, row in by_rank.items():
        assert row["WORLD_SIZE"] == "2" and row["LOCAL_RANK"] == rank
        assert row["SLURM_PROCID"] is None  # the launcher task's Slurm rank must not leak into the ranks
        assert row["argv"] == [f"--local_rank={rank}", "--foo", "a b"]
    job_hostfiles = list((tmp_path / "logs").glob("hostfile-*"))
    assert [p.read_text() for p in job_hostfiles] == [f"{os.uname().nodename.split('.')[0]} slots=2\n"]
