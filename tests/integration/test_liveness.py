"""Liveness of the rank others wait for: a dead working rank ends the wait within dist.stale_minutes
with one line naming it; a slow but live one is kept alive by its heartbeat.

The ranks here are two plain processes with RANK/WORLD_SIZE/MASTER_* set by the test, as under srun
without --kill-on-bad-exit or mpirun on a lost node: nothing ends the surviving rank for us (torchrun
would kill it as soon as the other died, which hides the bug).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, base_recipe, free_port, train_losses, write_recipe

STALE_MINUTES = 0.05  # 3 s: beats every 0.6 s
SFT_DEMO = os.path.join(REPO, "data/demo/sft_train.jsonl")


class Ranks:
    """`world` plain processes of one launch; stderr of each in a file the test can read while they run."""

    def __init__(self, tmp_path, args: list[str], world: int = 2, env: dict | None = None, tag: str = "run"):
        port = free_port()
        self.err = [tmp_path / f"{tag}-rank{r}.err" for r in range(world)]
        self.procs = []
        for r in range(world):
            full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                    "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), **(env or {})}
            with open(self.err[r], "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=f,
                                                   env=full, cwd=REPO))
        self.exit_at: dict[int, float] = {}

    def stderr(self, r: int) -> str:
        return self.err[r].read_text()

    def wait(self, timeout: float, until=None) -> None:
        """Until every process ended (or `until()` is true), recording when each ended; fail at the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r, p in enumerate(self.procs):
                if r not in self.exit_at and p.poll() is not None:
                    self.exit_at[r] = time.monotonic()
            if len(self.exit_at) == len(self.procs) or (until is not None and until()):
                return
            time.sleep(0.1)
        tails = "\n".join(f"--- rank {r}\n{self.stderr(r)[-2000:]}" for r in range(len(self.procs)))
        pytest.fail(f"still running after {timeout} s:\n{tails}")

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def assert_one_line_naming_rank_0(text: str) -> str:
    lines = error_lines(text)
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "rank 0 (host" in lines[0] and "dist.stale_minutes" in lines[0] and "no sign of life" in lines[0]
    return lines[0]


@pytest.mark.multiproc
def test_a_killed_exporting_rank_ends_the_waiting_rank_within_the_stale_limit_with_one_line(tmp_path, tiny_model_dir):
    """Rank 0 is SIGKILLed (as by the OOM killer) when it starts writing final/; rank 1, polling for its
    marker, must stop a few seconds after rank 0's heartbeat stopped, not at dist.wait_minutes (24 h)."""
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=1)
    recipe["dist"] = {"stale_minutes": STALE_MINUTES, "timeout_minutes": 2.0}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    ranks = Ranks(tmp_path, [os.path.join(REPO, "launch/sft.py"), "--recipe", path], env={"LLMTRAIN_TEST_DIE_IN": "final"})
    try:
        ranks.wait(timeout=300)
    finally:
        ranks.kill_all()
    assert ranks.procs[0].returncode == -signal.SIGKILL, ranks.stderr(0)[-3000:]
    assert ranks.procs[1].returncode == 2, ranks.stderr(1)[-3000:]
    waited = ranks.exit_at[1] - ranks.exit_at[0]
    assert waited < STALE_MINUTES * 60 + 20, waited  # the stale limit plus the backoff and the exit
    line = assert_one_line_naming_rank_0(ranks.stderr(1))
    assert "to write" in line and "final" in line  # says what rank 0 was doing
    assert len(train_losses(recipe["output_dir"])) == 1  # training itself finished before the export


def _prep_recipe(tmp_path, tiny_model_dir, name: str) -> str:
    rows = tmp_path / "rows.jsonl"
    if not rows.exists():
        with open(SFT_DEMO) as src, open(rows, "w") as dst:
            dst.writelines(line for _, line in zip(range(6400), src))  # 100 chunks of 64 rows: both ranks get some
    recipe = base_recipe(tmp_path / name, tiny_model_dir, max_steps=1)
    os.makedirs(tmp_path / name, exist_ok=True)
    recipe["data"].update(train=[str(rows)], prepare_workers=1, prepare_chunk_rows=64,
                          cache_dir=str(tmp_path / name / "cache"))
    recipe["dist"] = {"stale_minutes": STALE_MINUTES, "timeout_minutes": 2.0}
    return write_recipe(tmp_path / name / "r.yaml", recipe)


@pytest.mark.multiproc
def test_heartbeat_keeps_a_slow_preparing_rank_alive_and_a_killed_one_ends_the_wait_with_one_line(tmp_path,
                                                                                                    tiny_model_dir):
    # slow but alive: rank 0 spends 9 s in one chunk (3x the stale limit) while rank 1 waits for it
    path = _prep_recipe(tmp_path, tiny_model_dir, "slow")
    ranks = Ranks(tmp_path, [os.path.join(REPO, "launch/sft.py"), "--recipe", path], tag="slow",
                  env={"LLMTRAIN_TEST_PREPARE_DELAY": "0:9"})
    try:
        ranks.wait(timeout=300)
    finally:
        ranks.kill_all()
    assert [p.returncode for p in ranks.procs] == [0, 0], ranks.stderr(0)[-2000:] + ranks.stderr(1)[-2000:]
    assert "[rank 1] [prepare] waiting for" in ranks.stderr(1)  # rank 1 did wait, past the stale limit
    assert len(train_losses(str(tmp_path / "slow" / "run"))) == 1

    # dead: rank 0 stalls 300 s in a chunk and is SIGKILLed while rank 1 waits for that chunk
    path = _prep_recipe(tmp_path, tiny_model_dir, "dead")
    ranks = Ranks(tmp_path, [os.path.join(REPO, "launch/sft.py"), "--recipe", path], tag="dead",
                  env={"LLMTRAIN_TEST_PREPARE_DELAY": "0:300"})
    try:
        ranks.wait(timeout=240, until=lambda: "[rank 1] [prepare] waiting for" in ranks.stderr(1))
        assert ranks.procs[1].poll() is None, ranks.stderr(1)[-3000:]
        killed_at = time.monotonic()
        ranks.procs[0].kill()
        ranks.wait(timeout=120)
    finally:
        ranks.kill_all()
    assert ranks.procs[1].returncode == 2, ranks.stderr(1)[-3000:]
    waited = ranks.exit_at[1] - killed_at
    assert waited < STALE_MINUTES * 60 + 20, waited
    line = assert_one_line_naming_rank_0(ranks.stderr(1))
    assert "prepare data.train" in line
