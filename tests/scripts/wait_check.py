"""torchrun helper for test_waiting: waiting.one_rank_does across two real ranks over gloo.

Collectives time out after 12 s here (dist.init(timeout_minutes=0.2)); rank 0's work in the "ok"
case takes 14 s, so a waiting rank sitting in a collective would fail where polling does not. The
stale limit is 3 s (stale_minutes=0.05): rank 0's heartbeat must keep the waiting rank from giving up.
Each rank prints one JSON line per case: {"case", "rank", "outcome", "detail", "seconds", ...}.
"""
import json
import os
import sys
import time


from llmtrain import distributed as dist
from llmtrain.distributed import waiting  # noqa: E402
from llmtrain.config import ConfigError  # noqa: E402

marker_dir, work_seconds = sys.argv[1], float(sys.argv[2])
info = dist.init(timeout_minutes=0.2)
done_file = os.path.join(marker_dir, "work-output")


def ok_work():
    time.sleep(work_seconds)  # longer than the 12 s collective timeout
    with open(done_file, "w") as f:
        f.write("written by rank 0")
    return 42


def failing_work():
    time.sleep(1)
    raise ConfigError("bad thing in the recipe")


def slow_work():
    time.sleep(6)


cases = [("ok", ok_work, 5.0), ("fail", failing_work, 5.0), ("timeout", slow_work, 0.05)]
for case, work, wait_minutes in cases:
    start = time.monotonic()
    row = {"case": case, "rank": info.rank}
    try:
        result = waiting.one_rank_does(work, name=case, what=f"do the {case} work", marker_dir=marker_dir,
                                       timeout_minutes=wait_minutes, stale_minutes=0.05)
        row.update(outcome="returned", detail=result, saw_output=os.path.exists(done_file))
    except Exception as e:  # noqa: BLE001 - reported to the test
        row.update(outcome=type(e).__name__, detail=str(e), exit_code=waiting.exit_code_of(e))
    row["seconds"] = round(time.monotonic() - start, 2)
    print(json.dumps(row), flush=True)
sys.exit(dist.finish(0))
