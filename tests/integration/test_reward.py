"""Reward-model runs (real DeepSpeed over gloo): ln 2 at step 0 with the zeroed head, 2 ranks under ZeRO-3
== 1 rank with accumulation (an uneven eval split included), exact resume, bad rows counted, final/ a
sequence-classification directory that `llmtrain score` reads to the run's own eval figures, LoRA merged."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
from conftest import BIN, REPO, free_port, python_cmd, read_metrics, run_cmd, write_recipe

DPO_TRAIN = os.path.join(REPO, "data/demo/dpo_train.jsonl")
DPO_EVAL = os.path.join(REPO, "data/demo/dpo_eval.jsonl")
EVAL_PAIRS = 5  # mbs 2 over 2 ranks: rank 0 gets 3 rows, rank 1 two rows and a padding batch
BAD_LINES = {41: "chosen equals rejected", 42: "needs 'chosen' and 'rejected'", 43: ""}  # line -> reason fragment


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward_data")
    good = open(DPO_TRAIN).read().splitlines()[:40]
    bad = [json.dumps({"prompt": "1+1?", "chosen": "2", "rejected": "2"}),
           json.dumps({"prompt": "1+1?", "chosen": "2"}),
           '{"prompt": "unterminated']
    train = d / "train.jsonl"
    train.write_text("\n".join(good + bad + good[:8]) + "\n")
    ev = d / "eval.jsonl"
    ev.write_text("\n".join(open(DPO_EVAL).read().splitlines()[:EVAL_PAIRS]) + "\n")
    zero3 = json.load(open(os.path.join(REPO, "ds_configs/zero3.json")))
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition the tiny model
    z3 = d / "zero3_all_partitioned.json"
    z3.write_text(json.dumps(zero3))
    return {"train": str(train), "eval": str(ev), "zero3": str(z3)}


def reward_recipe(out_dir, model_dir, files, **train) -> dict:
    return {
        "output_dir": str(out_dir),
        "model": {"name_or_path": model_dir},
        "data": {"train": [files["train"]], "eval": [files["eval"]], "max_seq_len": 64, "max_prompt_len": 48,
                 "packing": False, "max_bad_fraction": 0.1},
        "train": {"max_steps": 4, "seed": 1, "micro_batch_size": 2, "grad_accum": 4, "lr": 1e-2, "warmup_steps": 1,
                  "log_every": 1, "eval_every": 2, "save_every": 2, **train},
        "reward": {"center_coef": 0.01},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero0.json")},
        "logging": {"progress": False},
    }


def run_reward(tmp_path, recipe, name, ranks=1):
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    if ranks > 1:  # the deepspeed launcher (torchrun, mpirun: the RL and SFT tests; Slurm: tests/cluster)
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               os.path.join(REPO, "launch/reward.py"), "--recipe", path]
    else:
        cmd = python_cmd("launch/reward.py", "--recipe", path)
    proc = run_cmd(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(recipe["output_dir"])
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir, data_files):
    tmp = tmp_path_factory.mktemp("reward_one")
    recipe = reward_recipe(tmp / "run", tiny_model_dir, data_files)
    train, evals = run_reward(tmp, recipe, "one")
    return {"dir": recipe["output_dir"], "train": train, "eval": evals, "tmp": tmp, "recipe": recipe}


def test_first_step_loss_is_ln2_with_the_zeroed_head_and_training_moves_it(one_rank):
    first, last = one_rank["train"][0], one_rank["train"][-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # centering adds 0 too: every reward is 0
    assert first["reward_accuracy"] == 0.0 and first["reward_margin"] == 0.0  # ties count as wrong
    assert last["loss"] != pytest.approx(math.log(2), abs=1e-4) and last["reward_margin"] != 0  # it learns
    assert {"chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin"} <= set(first)
    assert {"eval_reward_accuracy", "eval_chosen_reward", "eval_rejected_reward"} <= set(one_rank["eval"][-1])


def test_bad_rows_are_skipped_and_listed_with_file_and_line(one_rank, data_files):
    with open(os.path.join(one_rank["dir"], "bad_rows_train.jsonl")) as f:
        bad = [json.loads(line) for line in f]
    assert [b["origin"] for b in bad] == [f"{data_files['train']}:{n}" for n in BAD_LINES]
    for b, fragment in zip(bad, BAD_LINES.values()):
        assert fragment in b["reason"]


def test_final_is_a_sequence_classification_dir_that_scores_the_eval_file_to_the_run_figures(one_rank, data_files,
                                                                                           capsys):
    """final/ loads with AutoModelForSequenceClassification; `llmtrain score` on the eval file (one process,
    whole file, no padding batches) gives the run's last eval row: accuracy and mean rewards."""
    from llmtrain.cli import run

    final = os.path.join(one_rank["dir"], "final")
    config = json.load(open(os.path.join(final, "config.json")))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert glob.glob(os.path.join(final, "*.safetensors")) and os.path.isfile(os.path.join(final, "tokenizer.json"))
    out = os.path.join(one_rank["tmp"], "scores.jsonl")
    assert run("score", [final, "--data", data_files["eval"], "--max-seq-len", "64", "--json", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in open(out)]
    last_eval = one_rank["eval"][-1]
    assert summary["pairs"] == EVAL_PAIRS
    assert summary["accuracy"] == pytest.approx(last_eval["eval_reward_accuracy"])
    assert sum(r["chosen"] for r in rows) / EVAL_PAIRS == pytest.approx(last_eval["eval_chosen_reward"], abs=1e-5)
    assert sum(r["rejected"] for r in rows) / EVAL_PAIRS == pytest.approx(last_eval["eval_rejected_reward"], abs=1e-5)
    # a conversation file: each chosen conversation alone gets its pair's chosen reward
    from llmtrain.data.preference import to_pair

    convs = os.path.join(one_rank["tmp"], "convs.jsonl")
    with open(convs, "w") as f:
        for line in open(data_files["eval"]).read().splitlines()[:2]:
            f.write(json.dumps({"messages": to_pair(json.loads(line))[0]}) + "\n")
    out2 = os.path.join(one_rank["tmp"], "conv_scores.jsonl")
    assert run("score", [final, "--data", convs, "--max-seq-len", "64", "--json", out2, "--quiet"]) == 0
    singles = [json.loads(line)["reward"] for line in open(out2)]
    assert singles == pytest.approx([r["chosen"] for r in rows[:2]], abs=1e-5)


@pytest.mark.multiproc
def test_two_ranks_zero3_match_one_rank_with_accumulation_and_the_uneven_eval(one_rank, tiny_model_dir, data_files,
                                                                           tmp_path):
    import numpy as np

    from llmtrain.data.batching import eval_micro_batches

    # the premise: over 2 ranks the eval split is uneven and rank 1 runs a padding batch
    batches = eval_micro_batches(np.ones(EVAL_PAIRS), False, 128, 2, 2, 1)
    assert batches[len(batches) - 1] == []
    recipe = reward_recipe(tmp_path / "run", tiny_model_dir, data_files, grad_accum=2)
    recipe["deepspeed"]["config"] = data_files["zero3"]
    train, evals = run_reward(tmp_path, recipe, "two", ranks=2)
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward"):
        assert [r[key] for r in train] == pytest.approx([r[key] for r in one_rank["train"]], rel=1e-4, abs=1e-6), key
    for key in ("eval_loss", "eval_reward_accuracy", "eval_chosen_reward", "eval_rejected_reward"):
        assert [r[key] for r in evals] == pytest.approx([r[key] for r in one_rank["eval"]], rel=1e-4, abs=1e-6), key


def test_resume_from_the_step2_checkpoint_reproduces_the_uninterrupted_losses(one_rank, tiny_model_dir, data_files,
                                                                             tmp_path):
    ckpt = os.path.join(one_rank["dir"], "checkpoints", "step_00000002")
    recipe = reward_recipe(tmp_path / "run", tiny_model_dir, data_files, resume=ckpt)
    train, evals = run_reward(tmp_path, recipe, "resumed")
    assert [r["step"] for r in train] == [3, 4]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in one_rank["train"][2:]], rel=1e-6, abs=1e-7)
    assert evals[-1]["eval_chosen_reward"] == pytest.approx(one_rank["eval"][-1]["eval_chosen_reward"], rel=1e-6)


def test_lora_reward_model_merges_into_a_sequence_classifier_with_the_trained_head(tiny_model_dir, data_files,
                                                                                  tmp_path):
    """A SEQ_CLS adapter with the score head saved beside it; lora.merge writes final/merged/, which scores
    the eval file to the run's last eval figures (the head trained, not dropped as a causal-LM merge would)."""
    from transformers import AutoModelForSequenceClassification

    from llmtrain.objectives.reward_scoring import RewardScorer, score_file

    recipe = reward_recipe(tmp_path / "run", tiny_model_dir, data_files, max_steps=2, save_every=0)
    recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge": True}
    _, evals = run_reward(tmp_path, recipe, "lora")
    final = os.path.join(recipe["output_dir"], "final")
    adapter = json.load(open(os.path.join(final, "adapter_config.json")))
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    merged = AutoModelForSequenceClassification.from_pretrained(os.path.join(final, "merged"))
    assert merged.score.weight.abs().sum() > 0  # trained from its zero start
    for path in (os.path.join(final, "merged"), final):  # the merged dir, and the adapter merged in memory
        rows = list(score_file(RewardScorer.load(path), data_files["eval"], max_seq_len=64))
        mean_chosen = sum(r["chosen"] for r in rows) / len(rows)
        assert mean_chosen == pytest.approx(evals[-1]["eval_chosen_reward"], abs=1e-5)
