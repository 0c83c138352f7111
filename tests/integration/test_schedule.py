"""LR schedule: the logged LR is the one each step used, warmup longer than the run is clamped,
and a resume applies the recipe's (possibly changed) schedule and optimizer settings."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import base_recipe, python_cmd, read_metrics, run_cmd, write_recipe
from llmtrain.config import load_config

TIMEOUT = 300


def hand_lr(step: int, *, peak: float, max_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR of 1-based optimizer step `step`: linear warmup (step / warmup), then cosine from the
    peak to min_ratio * peak at the last step (written out here, independently of engine.py)."""
    i = step - 1
    if i < warmup:
        return peak * (i + 1) / warmup
    progress = min(1.0, (i - warmup) / max(1, max_steps - warmup - 1))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sft(path: str, *overrides: str):
    return run_cmd(python_cmd("launch/sft.py", "--recipe", path, *overrides), timeout=TIMEOUT)


def test_warmup_longer_than_max_steps_is_clamped_with_a_notice(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path, tiny_model_dir, warmup_steps=20))
    cfg = load_config(path, ["train.max_steps=4"])
    assert cfg.train.warmup_steps == 4
    assert cfg.notices == ["notice: train.warmup_steps=20 exceeds train.max_steps=4; warmup clamped to 4 steps"]
    assert load_config(path, ["train.max_steps=40"]).notices == []


def test_resume_applies_the_recipes_new_schedule_and_logs_each_steps_lr(tmp_path, tiny_model_dir):
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=4, warmup_steps=6, lr=1e-3, save_every=2)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = recipe["output_dir"]

    first = sft(path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "notice: train.warmup_steps=6 exceeds train.max_steps=4; warmup clamped to 4 steps" in first.stdout
    # the LR each step trained with, the first step's included (warmup: step / 4 of the peak)
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}
    assert lrs == pytest.approx({s: hand_lr(s, peak=1e-3, max_steps=4, warmup=4) for s in (1, 2, 3, 4)}, rel=1e-9)
    assert lrs[1] == pytest.approx(2.5e-4)

    # extend the run (and lower the peak, add weight decay): the new values apply from step 5
    second = sft(path, "train.max_steps=8", "train.lr=5e-4", "train.weight_decay=0.1")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = [line for line in second.stdout.splitlines() if line.startswith("resume:")]
    assert lines == ["resume: from step 4 on, the recipe's settings apply: train.max_steps 4 -> 8, "
                     "train.warmup_steps 4 -> 6, train.lr 0.001 -> 0.0005, train.weight_decay 0 -> 0.1"]
    rows = {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}
    assert sorted(rows) == list(range(1, 9))
    assert {s: rows[s] for s in (5, 6, 7, 8)} == pytest.approx(
        {s: hand_lr(s, peak=5e-4, max_steps=8, warmup=6) for s in (5, 6, 7, 8)}, rel=1e-9)
    assert rows[8] == pytest.approx(5e-5)  # min_lr_ratio x the new peak at the new last step

    # what the step-8 checkpoint saved is the new setting (a later resume starts from it)
    saved = torch.load(os.path.join(out, "checkpoints/step_00000008/mp_rank_00_model_states.pt"), weights_only=False)
    assert saved["lr_scheduler"]["base_lrs"] == pytest.approx([5e-4, 5e-4])
    assert saved["lr_scheduler"]["lr_lambdas"][0]["kw"] == {"max_steps": 8, "warmup_steps": 6, "schedule": "cosine",
                                                            "min_lr_ratio": 0.1}
    groups = {g["llmtrain_group"]: g for g in saved["optimizer"]["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0

    # ending the run before the checkpoint's step makes no sense: one line naming the key
    third = sft(path, "train.max_steps=6")
    assert third.returncode == 2, third.stdout[-2000:] + third.stderr[-2000:]
    assert "Traceback" not in third.stderr
    errors = [line for line in third.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train.max_steps=6 is below step 8 of the checkpoint" in errors[0], third.stderr
