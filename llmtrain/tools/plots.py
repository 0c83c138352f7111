"""Run curves from metrics.jsonl -> PNG: loss (train + eval), learning rate, tokens/s and, for
DPO, reward accuracy and margin. One run (`write_curves`, called at the end of every run) or
several overlaid (`plot_runs`, used by `llmtrain plot` / `launch/plot.py`).

matplotlib (a base dependency) is imported lazily with the Agg backend (no display needed on a
cluster node). A failure to plot never fails a run: `write_curves` says at the end of the run why
there is no curves.png (matplotlib missing from an environment installed without dependencies, an
unreadable metrics.jsonl) and returns None.
"""
from __future__ import annotations

import json
import os
from typing import Optional

# (title, [(metrics.jsonl key, label suffix, line style)]) per panel, in display order
_PANELS = [
    ("loss", [("loss", "train", "-"), ("eval_loss", "eval", "o--")]),
    ("learning rate", [("lr", "", "-")]),
    ("tokens/s (real tokens, all ranks)", [("tokens_per_sec", "", "-")]),
    ("reward accuracy (DPO, reward model)", [("reward_accuracy", "train", "-"), ("eval_reward_accuracy", "eval", "o--")]),
    ("reward margin (DPO, reward model)", [("reward_margin", "train", "-"), ("eval_reward_margin", "eval", "o--")]),
]


def read_metrics(run_dir: str) -> list[dict]:
    """Rows of run_dir/metrics.jsonl; a truncated last line (a run killed mid-write) is skipped."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: dict[str, list[dict]], out_path: str, title: Optional[str] = None) -> str:
    """Overlay runs ({label: metrics rows}) into one PNG; panels without data in any run are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    panels = [(t, keys) for t, keys in _PANELS if any(_series(rows, k)[0] for rows in runs.values() for k, _, _ in keys)]
    if not panels:
        raise ValueError("no plottable metrics (step with loss, lr, tokens_per_sec, ...) in " + ", ".join(runs))
    cols = min(len(panels), 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(runs.items()):
            for key, suffix, style in keys:
                xs, ys = _series(rows, key)
                if xs:
                    name = " ".join(x for x in (label if len(runs) > 1 else "", suffix) if x)
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], label=name or None, markersize=3,
                            linewidth=1.4, alpha=0.9 if suffix != "eval" else 1.0)
        ax.set_title(panel_title, fontsize=10)
        if panel_title.startswith("tokens/s"):
            ax.set_ylim(bottom=0)  # throughput from zero: jitter should not look like a trend
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def write_curves(output_dir: str) -> Optional[str]:
    """output_dir/curves.png from output_dir/metrics.jsonl (rank 0 only: it wrote the metrics);
    warns (never raises) on failure."""
    from .. import distributed as dist

    if not dist.is_main():
        return None
    out = os.path.join(output_dir, "curves.png")
    try:
        import matplotlib  # noqa: F401  (a base dependency; absent only from an install without dependencies)
    except ImportError:
        dist.warn(f"no {out}: matplotlib is not installed in this environment; metrics.jsonl holds the same "
                  f"figures: pip install matplotlib, then `llmtrain plot {output_dir}` draws them")
        return None
    try:
        return plot_runs({os.path.basename(os.path.normpath(output_dir)): read_metrics(output_dir)},
                         out, title=os.path.normpath(output_dir))
    except Exception as e:  # a plot is a convenience: the run itself succeeded
        dist.warn(f"could not write {out}: {type(e).__name__}: {e}")
        return None
