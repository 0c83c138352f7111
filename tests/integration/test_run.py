"""Whole single-process runs: preemption + exact resume, retention, output layout, wandb offline, chat CLI."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

from conftest import REPO, base_recipe, python_cmd, read_metrics, run_cmd, train_losses, write_recipe


def test_preempted_run_resumes_to_the_uninterrupted_losses(tmp_path, tiny_model_dir):
    recipe = base_recipe(tmp_path / "a", tiny_model_dir, max_steps=8, save_every=2, keep_last=2, eval_every=4)
    recipe["data"]["eval"] = [os.path.join(REPO, "data/demo/sft_eval.jsonl")]
    recipe["logging"]["wandb"] = {"mode": "offline"}
    os.makedirs(tmp_path / "a")
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", write_recipe(tmp_path / "a.yaml", recipe)), timeout=240,
                   env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = recipe["output_dir"]
    reference = train_losses(out)
    assert len(reference) == 8
    # output layout of the DESIGN contract
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000006", "step_00000008"]
    assert glob.glob(os.path.join(out, "final", "*.safetensors")) and os.path.isfile(os.path.join(out, "final", "tokenizer.json"))
    rows = read_metrics(out)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    # wandb offline wrote a real run directory
    assert glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))

    # the same run, interrupted by SIGTERM (what Slurm sends before a kill), then resumed
    recipe["output_dir"] = str(tmp_path / "b" / "run")
    recipe["train"]["save_every"] = 0
    recipe["logging"]["wandb"] = {"mode": "disabled"}
    path = write_recipe(tmp_path / "b.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(python_cmd("launch/sft.py", "--recipe", path), cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(recipe["output_dir"], "metrics.jsonl")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 3, log[-3000:]
    stopped_at = len(train_losses(recipe["output_dir"]))
    assert 2 <= stopped_at < 8 and "checkpointed at step" in log
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert train_losses(recipe["output_dir"]) == reference  # bitwise: same data, RNG, optimizer state


def test_chat_cli_answers_from_a_model_directory(tiny_model_dir):
    proc = run_cmd(python_cmd("launch/chat.py", tiny_model_dir, "--prompt", "What is 1 + 2?", "--max-new-tokens", "4"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cmd(python_cmd("launch/chat.py", "/nonexistent"), timeout=60)
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
