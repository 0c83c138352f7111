"""Run metrics: metrics.jsonl, wandb, and the rank-0 progress bar.

Only rank 0 gets a real `MetricsLogger`; every other rank gets `NullLogger`, so the loop
calls `logger.log(...)` unconditionally.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from ..config import Config, redact, to_dict


class NullLogger:
    def log(self, row: dict) -> None: ...
    def progress(self, step: int, row: Optional[dict] = None) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class MetricsLogger(NullLogger):
    def __init__(self, cfg: Config, start_step: int):
        self.cfg = cfg
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        _truncate_after(self.path, start_step)  # rows past the resumed checkpoint belong to lost work
        self.file = open(self.path, "a")
        self.bar = None
        if cfg.logging.progress and sys.stderr.isatty():  # batch-job logs get plain lines instead
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.wandb = None
        w = cfg.logging.wandb
        if w.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=w.project, entity=w.entity, name=w.name or os.path.basename(os.path.normpath(cfg.output_dir)),
                mode=w.mode, dir=cfg.output_dir, config=redact(to_dict(cfg)),
                resume="allow", id=_wandb_id(cfg),
            )

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def progress(self, step: int, row: Optional[dict] = None) -> None:
        if self.bar is None:
            if row is not None and "loss" in row:  # no bar: a plain line per logged step (non-tty logs)
                print(_line(row), flush=True)
            return
        self.bar.n = step
        if row is not None and "loss" in row:
            self.bar.set_postfix_str(_line(row, short=True), refresh=False)
        self.bar.refresh()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(cfg: Config) -> str:
    """Stable run id per output_dir, so a resumed run continues the same wandb run."""
    path = os.path.join(cfg.output_dir, ".wandb_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(rid)
    return rid


def _line(row: dict, short: bool = False) -> str:
    parts = [] if short else [f"step {row['step']}"]
    for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_sec", "{:.0f}"), ("reward_accuracy", "{:.3f}"), ("mfu", "{:.3f}")):
        if row.get(key) is not None:
            parts.append(f"{'tok/s' if key == 'tokens_per_sec' else key}={fmt.format(row[key])}")
    return " ".join(parts)


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
    if len(keep) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def make_logger(cfg: Config, is_main: bool, start_step: int):
    return MetricsLogger(cfg, start_step) if is_main else NullLogger()


class Throughput:
    """Real (non-padding) tokens per second over all ranks, measured between log steps."""

    def __init__(self):
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.tokens, self.t0 = 0, now
        return rate
