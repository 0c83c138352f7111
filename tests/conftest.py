"""The one conftest: tiny real HF models saved locally, recipe writing, launcher helpers, the demo
data generator, and the markers each test directory implies.

tests/unit         in this process (a one-rank DeepSpeed engine at most)       marker `unit`
tests/integration  starts processes: commands, launchers, ranks over gloo     marker `integration`
tests/cluster      starts a machine-wide Slurm cluster (root)                 marker `cluster`
A test elsewhere that starts processes carries `@pytest.mark.integration` itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
BIN = os.path.dirname(sys.executable)

# every process a test starts imports this checkout's llmtrain (not another installed copy)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

# one thread per rank: two ranks on two cores otherwise fight over every core
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=None),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def _load_example(name: str):
    """examples/<name>.py (demo code, not part of the library) as a module."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synth = _load_example("synth")  # the demo data generator (examples/synth.py): synthetic data for tests


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = os.path.relpath(str(item.fspath), os.path.join(REPO, "tests")).split(os.sep)
        if parts[0] in ("unit", "integration", "cluster"):
            item.add_marker(parts[0])


def build_tiny(arch: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    spec = dict(TINY[arch])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model, tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real local HF model directory (Llama architecture, random weights) + the shipped tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model, tok = build_tiny("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_recipe(path, recipe: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return str(path)


def base_recipe(tmp_path, model_dir: str, **train) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": model_dir},
        "data": {"train": [os.path.join(REPO, "data/demo/sft_train.jsonl")], "max_seq_len": 64, "packing": True},
        "train": {"max_steps": 4, "seed": 1, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1,
                  "log_every": 1, **train},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero0.json")},
        "logging": {"progress": False},
    }


def run_cmd(cmd: list[str], timeout: float = 300, env: dict | None = None, cwd: str = REPO):
    """Run a launcher under a hard timeout; returns CompletedProcess (text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = BIN + os.pathsep + full_env.get("PATH", "")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")


def python_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, script), *args]


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(output_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


def free_port() -> int:
    """A port nobody listens on now: concurrent test runs on one machine must not share a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None or os.path.exists(os.path.join(BIN, cmd))
