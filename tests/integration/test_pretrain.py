"""Pretraining: prepare through the CLI -> rows -> 2-rank training -> exact resume; packing isolation."""
from __future__ import annotations

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import BIN, REPO, TINY, TOKENIZER, build_tiny, free_port, python_cmd, read_metrics, run_cmd, train_losses, write_recipe
from llmtrain.config import load_config
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.protocol import DataContext
from llmtrain.data.shards.rows import PretrainData, collate_windows
from llmtrain.objectives import Pretrain
from llmtrain.losses import shift_labels

TIMEOUT = 300
SEQ = 64  # data.max_seq_len: short rows, so many rows hold a document boundary


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A generated corpus (many short documents, in JSONL) prepared through `launch/prepare.py`."""
    from conftest import synth

    tmp = tmp_path_factory.mktemp("pretrain")
    for name, n, seed in (("train.jsonl", 400, 1), ("eval.jsonl", 30, 2)):
        with open(tmp / name, "w") as f:
            for doc in synth.pretrain_corpus(n, seed=seed):
                f.write(json.dumps({"text": doc}) + "\n")
    recipe = {
        "output_dir": str(tmp / "run"),
        "model": {"tokenizer": TOKENIZER, "config": {**TINY["llama"], "max_position_embeddings": SEQ}},
        "data": {"train": [{"path": str(tmp / "shards/train"), "prepare_from": str(tmp / "train.jsonl")}],
                 "eval": [{"path": str(tmp / "shards/eval"), "prepare_from": [str(tmp / "eval.jsonl")]}],
                 "max_seq_len": SEQ, "packing": True},
        "train": {"max_steps": 4, "seed": 3, "micro_batch_size": 2, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 1,
                  "log_every": 1, "save_every": 2, "eval_every": 2, "eval_max_batches": 2},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero2.json")},
        "logging": {"progress": False},
    }
    path = write_recipe(tmp / "pretrain.yaml", recipe)
    proc = run_cmd(python_cmd("launch/prepare.py", "--recipe", path, "--workers", "1"), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, recipe=recipe, path=path, first_stdout=proc.stdout)


def make_data(prepared, world_size=1, rank=0, **train) -> PretrainData:
    from transformers import AutoTokenizer

    overrides = [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config(prepared.path, overrides)
    info = SimpleNamespace(world_size=world_size, rank=rank, device=torch.device("cpu"))
    return Pretrain.from_config(cfg).build_data(DataContext.of(cfg, AutoTokenizer.from_pretrained(TOKENIZER), info, "unused"))


def test_prepare_cli_rerun_is_a_noop(prepared):
    assert "done:" in prepared.first_stdout
    manifest = json.load(open(prepared.tmp / "shards/train/manifest.json"))
    assert manifest["total_docs"] == 400 and manifest["bad_rows"] == 0
    proc = run_cmd(python_cmd("launch/prepare.py", "--recipe", prepared.path, "--workers", "1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("up to date") == 2 and "to tokenize" not in proc.stdout


def _step_rows(data: PretrainData) -> tuple[list[list[int]], int]:
    plan = data.next_step()
    return plan.micro_batches, plan.global_weight


def test_two_ranks_see_the_global_batch_of_one_rank_with_accumulation(prepared):
    """Rank r, micro m takes rows from ((m * world) + r) * mbs: 2 ranks x accum 2 == 1 rank x accum 4."""
    one = make_data(prepared, grad_accum=4)
    ranks = [make_data(prepared, world_size=2, rank=r, grad_accum=2) for r in (0, 1)]
    for _ in range(3):
        ref, ref_weight = _step_rows(one)
        (r0, w0), (r1, w1) = (_step_rows(d) for d in ranks)
        assert w0 == w1 == ref_weight  # every rank computes the global normaliser alone
        assert [r0[0], r1[0], r0[1], r1[1]] == ref


def test_global_weight_counts_exactly_the_target_tokens(prepared):
    data = make_data(prepared, grad_accum=2)
    for _ in range(3):
        plan = data.next_step()
        batches = data.batches(plan)
        targets = sum(int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in batches)
        assert targets == plan.global_weight
        assert all(b["input_ids"].shape == (2, SEQ) for b in batches)
        # packing masks some labels at document starts, so fewer than SEQ - 1 targets per row
        assert plan.global_weight < 4 * (SEQ - 1)


def test_state_dict_resume_continues_the_row_order(prepared):
    straight = make_data(prepared)
    order = [_step_rows(straight)[0] for _ in range(6)]
    first = make_data(prepared)
    for _ in range(3):
        first.next_step()
    resumed = make_data(prepared)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as saved in a checkpoint
    assert [_step_rows(resumed)[0] for _ in range(3)] == order[3:]


def test_packed_documents_give_the_same_logits_as_each_alone(prepared):
    """position_ids restart at each document: attention never crosses a packed boundary."""
    data = make_data(prepared)
    model, _ = build_tiny("llama")
    model.eval()
    checked = 0
    for k in range(20):
        tokens, starts = data._window(k)
        if len(starts[starts > 0]) == 0:
            continue
        batch = collate_windows([(tokens, starts)], pad_id=0)
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            for piece_start, piece in zip([0, *starts[starts > 0]], np.split(tokens, starts[starts > 0])):
                alone = model(input_ids=torch.from_numpy(piece)[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[piece_start:piece_start + len(piece)], alone, rtol=1e-4, atol=1e-4)
                checked += 1
        # the label predicting a document's first token from the previous document is masked
        labels = batch["labels"][0]
        assert all(labels[s] == IGNORE_INDEX for s in starts)
    assert checked >= 4


def test_tokenizer_hash_mismatch_is_a_one_line_error(prepared, tmp_path):
    from transformers import AutoTokenizer

    from llmtrain.data.shards.prepare import prepare_corpus

    other = AutoTokenizer.from_pretrained(TOKENIZER)
    other.add_tokens(["<|not-in-the-run-tokenizer|>"])  # a different vocabulary: a different hash
    prepare_corpus([str(prepared.tmp / "eval.jsonl")], other, str(tmp_path / "other"), num_workers=1, progress=False)
    proc = run_cmd(python_cmd("launch/pretrain.py", "--recipe", prepared.path, f"output_dir={tmp_path / 'run'}",
                              f"data.train=[{tmp_path / 'other'}]", "data.eval=[]"), timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: data.train[0]:"), proc.stderr
    assert "tokenizer" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_resume_reproduces_uninterrupted_losses(prepared, tmp_path):
    """2 ranks (torchrun, ZeRO-2): a run resumed from its step-2 checkpoint logs the same losses
    (and eval loss) as the uninterrupted run: the same rows, in the same order, nothing skipped."""
    def torchrun(recipe_path, port):
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
               os.path.join(REPO, "launch/pretrain.py"), "--recipe", recipe_path]
        proc = run_cmd(cmd, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc

    full = prepared.recipe["output_dir"]
    proc = torchrun(prepared.path, free_port())
    assert "2 rank(s)" in proc.stdout + proc.stderr
    # the interrupted run: the same output dir as it was after step 2's checkpoint
    cut = str(tmp_path / "cut")
    shutil.copytree(full, cut)
    shutil.rmtree(os.path.join(cut, "final"))
    tags = [t for t in os.listdir(os.path.join(cut, "checkpoints")) if t.startswith("step_")]
    assert sorted(tags) == ["step_00000002", "step_00000004"]
    shutil.rmtree(os.path.join(cut, "checkpoints", "step_00000004"))
    recipe = {**prepared.recipe, "output_dir": cut}
    proc = torchrun(write_recipe(tmp_path / "resume.yaml", recipe), free_port())
    assert "resumed from" in proc.stdout + proc.stderr
    want, got = train_losses(full), train_losses(cut)
    assert len(want) == 4 and want[-1] < want[0]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    evals = [[r["eval_loss"] for r in read_metrics(d) if "eval_loss" in r] for d in (full, cut)]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)
    rows = [r for r in read_metrics(full) if "loss" in r]
    assert all(r["tflops_per_gpu"] > 0 and "mfu" not in r for r in rows)  # CPU: no known peak, no MFU
    assert os.path.isfile(os.path.join(cut, "final", "config.json"))


def test_eval_on_uneven_ranks_sums_to_the_one_rank_loss(prepared):
    """Eval rows that do not divide by ranks x micro-batch: the short rank's padding batches add 0
    and every rank runs as many forwards (ZeRO-3 gathers are collective)."""
    model, _ = build_tiny("llama")
    task = Pretrain()
    rows = len(list(make_data(prepared, eval_max_batches=0, micro_batch_size=1).eval_set().batches))
    mbs = next(m for m in (1, 2, 3, 4, 5) if rows % (2 * m))

    def eval_loss(world: int) -> tuple[float, list[int], set]:
        total, counts, weights = 0.0, [], set()
        for rank in range(world):
            eval_set = make_data(prepared, world_size=world, rank=rank, eval_max_batches=0, micro_batch_size=mbs).eval_set()
            batches = list(eval_set.batches)
            counts.append(len(batches))
            weights.add(eval_set.global_weight)
            with torch.no_grad():
                total += sum(task.loss(model, b, eval_set.global_weight)[0].item() for b in batches)
        return total, counts, weights

    one, one_counts, one_weights = eval_loss(1)
    two, two_counts, two_weights = eval_loss(2)
    assert two_counts[0] == two_counts[1] and two_weights == one_weights
    assert two == pytest.approx(one, rel=1e-6) and math.isfinite(two)
