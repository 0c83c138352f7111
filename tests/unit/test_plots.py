"""Run curves: curves.png from a metrics.jsonl (SFT and DPO columns), several runs overlaid, and a
failure to plot only warns."""
from __future__ import annotations

import json
import math
import os

from conftest import python_cmd, run_cmd
from llmtrain.tools.plots import write_curves


def _write_metrics(run_dir, dpo: bool = False, steps: int = 30) -> str:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "loss": 3 * math.exp(-s / 10) + 0.5, "lr": 1e-3 * min(1, s / 5), "grad_norm": 1.0,
                   "tokens_per_sec": 1000 + 10 * s}
            if dpo:
                row.update(reward_accuracy=min(1, 0.5 + s / 60), reward_margin=s / 20)
            f.write(json.dumps(row) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "eval_loss": 3 * math.exp(-s / 12) + 0.6}) + "\n")
        f.write('{"step": 31, "loss": ')  # a run killed mid-write: the torn line is skipped
    return str(run_dir)


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_curves_png_written_from_metrics(tmp_path):
    run = _write_metrics(tmp_path / "sft")
    assert write_curves(run) == os.path.join(run, "curves.png")
    assert _is_png(os.path.join(run, "curves.png"))
    dpo = _write_metrics(tmp_path / "dpo", dpo=True)
    assert _is_png(write_curves(dpo))


def test_plot_failure_only_warns(tmp_path, capsys):
    assert write_curves(str(tmp_path / "no-such-run")) is None
    assert "warning: could not write" in capsys.readouterr().err


def test_launch_plot_overlays_runs(tmp_path):
    a, b = _write_metrics(tmp_path / "a"), _write_metrics(tmp_path / "b", dpo=True, steps=20)
    out = tmp_path / "both.png"
    proc = run_cmd(python_cmd("launch/plot.py", a, b, "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _is_png(str(out))


def test_without_matplotlib_the_run_says_why_there_is_no_plot(tmp_path, capsys, monkeypatch):
    """An install without matplotlib (pip --no-deps, a trimmed image) gets one line at the end of the
    run naming the missing package and the command that draws the curves later, and no curves.png."""
    import sys

    run = _write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert write_curves(run) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0], err
    assert f"llmtrain plot {run}" in err[0] and not os.path.exists(os.path.join(run, "curves.png"))
