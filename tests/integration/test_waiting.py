"""waiting.one_rank_does: one rank works, the others poll a marker outside any collective."""
from __future__ import annotations

import json
import os

import pytest

from conftest import BIN, REPO, free_port, run_cmd
from llmtrain.distributed import waiting
from llmtrain.errors import StorageError
from llmtrain.config import ConfigError
from llmtrain.errors import DataError


@pytest.mark.multiproc
def test_waiting_ranks_outlast_the_collective_timeout_and_see_failures_and_timeouts_as_one_line(tmp_path):
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests/scripts/wait_check.py"), str(tmp_path), "14"]
    proc = run_cmd(cmd, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    rows = {(r["case"], r["rank"]): r for r in map(json.loads, lines)}
    # ok: rank 1 waited the 14 s of rank 0's work (past the 12 s collective timeout, and past the 3 s stale
    # limit: rank 0's heartbeat kept moving) and returned after it
    assert rows["ok", 0]["outcome"] == "returned" and rows["ok", 0]["detail"] == 42
    assert rows["ok", 1]["outcome"] == "returned" and rows["ok", 1]["detail"] is None
    assert rows["ok", 1]["saw_output"] and rows["ok", 1]["seconds"] >= 14
    # fail: rank 0's ConfigError reaches rank 1 as OtherRankFailed, same exit status, within seconds
    assert rows["fail", 0]["outcome"] == "ConfigError"
    r1 = rows["fail", 1]
    assert r1["outcome"] == "OtherRankFailed" and r1["exit_code"] == 2 and r1["seconds"] < 10
    assert "rank 0 failed to do the fail work: bad thing in the recipe" == r1["detail"]
    # timeout: rank 1 gives up after its own 3 s (dist.wait_minutes) with one line saying what it waited for
    r1 = rows["timeout", 1]
    assert r1["outcome"] == "WaitTimeout" and 2.5 < r1["seconds"] < 6 and r1["exit_code"] == 2
    assert "for rank 0 to do the timeout work" in r1["detail"] and "dist.wait_minutes" in r1["detail"]
    assert "still alive" in r1["detail"]  # its heartbeat moved: the cap ended the wait, not the stale limit
    assert "\n" not in r1["detail"]
    assert rows["timeout", 0]["outcome"] == "returned"


def test_exit_status_of_each_error_kind():
    assert waiting.exit_code_of(ConfigError("x")) == 2
    assert waiting.exit_code_of(DataError("x")) == 2
    assert waiting.exit_code_of(StorageError("x")) == 5
    assert waiting.exit_code_of(waiting.OtherRankFailed("x", 5)) == 5
    assert waiting.exit_code_of(KeyError("x")) == 1


def test_one_rank_world_just_runs_the_work(tmp_path):
    assert waiting.one_rank_does(lambda: 7, name="n", what="w", marker_dir=str(tmp_path), timeout_minutes=1) == 7
    assert not os.path.exists(tmp_path / waiting.MARKERS)  # nobody waits: no markers
