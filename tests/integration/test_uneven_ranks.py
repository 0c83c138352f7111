"""World sizes that do not divide the data: a rank with fewer eval rows (or reference pairs)
still runs as many forwards as the others (ZeRO-3 gathers are collective), its padding batches
contribute nothing, and the figures equal the one-rank run's."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import BIN, REPO, TOKENIZER, build_tiny, free_port, python_cmd, read_metrics, run_cmd, write_recipe
from llmtrain.config import load_config

TIMEOUT = 300
EVAL_KEYS = ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_chosen_logps", "eval_rejected_logps")


def head(src: str, dst, n: int) -> str:
    with open(src) as f, open(dst, "w") as g:
        for _ in range(n):
            g.write(f.readline())
    return str(dst)


def dpo_run(tmp_path, model_dir, name: str, ranks: int, stage: str, precompute: bool) -> list[dict]:
    # unpacked, micro-batch 1: 41 train pairs -> 21 + 20 per rank and 3 eval pairs -> 2 + 1, so
    # rank 1 gets one padding batch in the reference precompute and one in every eval
    recipe = {
        "output_dir": str(tmp_path / name),
        "model": {"name_or_path": model_dir},
        "data": {"train": [head(os.path.join(REPO, "data/demo/dpo_train.jsonl"), tmp_path / "train.jsonl", 41)],
                 "eval": [head(os.path.join(REPO, "data/demo/dpo_eval.jsonl"), tmp_path / "eval.jsonl", 3)],
                 "max_seq_len": 64, "max_prompt_len": 48, "packing": False},
        "train": {"max_steps": 2, "seed": 1, "micro_batch_size": 1, "grad_accum": 4 // ranks, "lr": 5e-3,
                  "warmup_steps": 1, "eval_every": 1, "log_every": 1},
        "dpo": {"beta": 0.1, "precompute_ref": precompute},
        "deepspeed": {"config": os.path.join(REPO, f"ds_configs/zero{stage}.json")},
        "logging": {"progress": False},
    }
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    if ranks == 1:
        cmd = python_cmd("launch/dpo.py", "--recipe", path)
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               os.path.join(REPO, "launch/dpo.py"), "--recipe", path]
    proc = run_cmd(cmd, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert os.path.isfile(os.path.join(recipe["output_dir"], "final", "config.json"))
    return read_metrics(recipe["output_dir"])


@pytest.mark.multiproc
def test_dpo_eval_and_precompute_on_uneven_ranks_equal_one_rank(tiny_model_dir, tmp_path):
    one = dpo_run(tmp_path, tiny_model_dir, "one", 1, "0", precompute=False)
    ref_evals = [r for r in one if "eval_loss" in r]
    assert [r["step"] for r in ref_evals] == [1, 2]
    for name, precompute in (("two-precompute", True), ("two-frozen", False)):
        rows = dpo_run(tmp_path, tiny_model_dir, name, 2, "3", precompute=precompute)
        evals = [r for r in rows if "eval_loss" in r]
        assert [r["step"] for r in evals] == [1, 2], name
        for got, ref in zip(evals, ref_evals):
            for k in EVAL_KEYS:
                assert math.isfinite(got[k]), (name, k, got)
                assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (name, k)
        losses = [r["loss"] for r in rows if "loss" in r]
        assert losses == pytest.approx([r["loss"] for r in one if "loss" in r], rel=1e-4, abs=1e-6), name
    assert ref_evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=0.05)  # policy ~ reference after 1 step


def _sums_over_ranks(task, data_for_rank, model, world: int) -> tuple[float, int, list[int]]:
    """Loss sum over every rank's eval batches (each rank's share, as the loop all-reduces them)."""
    total, counts, weight = 0.0, [], None
    with torch.no_grad():
        for rank in range(world):
            eval_set = data_for_rank(rank, world).eval_set()
            batches = list(eval_set.batches)
            counts.append(len(batches))
            weight = eval_set.global_weight if weight is None else weight
            assert eval_set.global_weight == weight  # every rank knows the whole eval set's normaliser
            for batch in batches:
                loss, _ = task.loss(model, batch, eval_set.global_weight)
                assert torch.isfinite(loss)
                total += loss.item()
    return total, weight, counts


def test_sft_eval_on_uneven_ranks_sums_to_the_one_rank_loss(tmp_path):
    """3 eval rows, micro-batch 1, 2 ranks: rank 1 runs one all-padding batch (0 loss, 0 targets)."""
    from transformers import AutoTokenizer

    from llmtrain.data.protocol import DataContext
    from llmtrain.objectives import SFT

    recipe = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": TOKENIZER},
              "data": {"train": [os.path.join(REPO, "data/demo/sft_train.jsonl")],
                       "eval": [head(os.path.join(REPO, "data/demo/sft_eval.jsonl"), tmp_path / "eval.jsonl", 3)],
                       "max_seq_len": 64, "packing": False},
              "train": {"micro_batch_size": 1, "grad_accum": 1}}
    cfg = load_config(write_recipe(tmp_path / "r.yaml", recipe))
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    task = SFT.from_config(cfg)
    model, _ = build_tiny("llama")

    def data_for_rank(rank, world):
        info = SimpleNamespace(world_size=world, rank=rank, device=torch.device("cpu"))
        return task.build_data(DataContext.of(cfg, tok, info, "tok"))

    one, one_weight, one_counts = _sums_over_ranks(task, data_for_rank, model, 1)
    two, two_weight, two_counts = _sums_over_ranks(task, data_for_rank, model, 2)
    assert one_counts == [3] and two_counts == [2, 2]
    assert two_weight == one_weight > 0
    assert two == pytest.approx(one, rel=1e-6)
