"""The ZeRO stage is a memory choice, never a numerical one: weight decay and from-scratch init
are the same under ZeRO-2 and ZeRO-3 (where every parameter is an empty 1-D partition)."""
from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, REPO, TINY, TOKENIZER, base_recipe, build_tiny, free_port, python_cmd, run_cmd, write_recipe

TIMEOUT = 300


def weights(model_dir: str) -> dict:
    sd = {}
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(model_dir, name)))
    return sd


def test_weight_decay_is_the_same_under_zero2_and_zero3(tiny_model_dir, tmp_path):
    """1 rank each, same seed, weight_decay > 0: same weights after 4 steps. The decay is large
    (10 x lr 1e-3 = 1% shrink per step) so that a stage without it is far outside the tolerance."""
    out = {}
    for stage in ("2", "3"):
        recipe = base_recipe(tmp_path / stage, tiny_model_dir, weight_decay=10.0, schedule="constant")
        recipe["deepspeed"]["config"] = os.path.join(REPO, f"ds_configs/zero{stage}.json")
        os.makedirs(tmp_path / stage)
        proc = run_cmd(python_cmd("launch/sft.py", "--recipe", write_recipe(tmp_path / stage / "r.yaml", recipe)),
                       timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[stage] = (proc.stdout, weights(os.path.join(recipe["output_dir"], "final")))

    a, b = out["2"][1], out["3"][1]
    start = weights(tiny_model_dir)
    assert a.keys() == b.keys()
    for k in a:
        # per tensor, relative to its norm: Adam's m/sqrt(v) turns an element's 1e-7 gradient difference
        # (the stages sum in another order; seen on AVX-512 CPUs) into a ~1e-6 weight difference, while a
        # stage without decay is ~4e-2 off (4 steps of a 1% shrink)
        rel = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, (k, rel)
    # and decay did act: 4 steps of a 1% shrink (0.99^4 = 0.961) outweigh Adam's lr-sized steps
    q = "model.layers.0.self_attn.q_proj.weight"
    assert a[q].norm() < 0.98 * start[q].norm()

    # hand check of the split, by name on the plain model: every projection matrix and the
    # embedding (and an untied LM head) decay; the RMSNorm weights do not (Llama has no biases)
    model, _ = build_tiny("llama")
    decay = [(n, p.numel()) for n, p in model.named_parameters() if n.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight"))]
    no_decay = [(n, p.numel()) for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    expected = (f"weight decay 10 on {len(decay)} tensors ({sum(n for _, n in decay):,} params: matrices, embeddings); "
                f"none on {len(no_decay)} ({sum(n for _, n in no_decay):,} params: biases, norms)")
    for stage, (stdout, _) in out.items():
        assert expected in stdout, (stage, re.findall(r"optimizer: .*", stdout))


def _initial_weights(tmp_path, name: str, stage: str, ranks: int) -> dict:
    recipe = {
        "output_dir": str(tmp_path / name),
        # tied embeddings: one tensor reached from two modules, the case HF's init flags skip
        "model": {"tokenizer": TOKENIZER, "config": {**TINY["llama"], "tie_word_embeddings": True}},
        "data": {"train": [os.path.join(REPO, "data/demo/sft_train.jsonl")], "max_seq_len": 64},
        "train": {"max_steps": 1, "seed": 7, "micro_batch_size": 1, "grad_accum": 1},
        "deepspeed": {"config": os.path.join(REPO, f"ds_configs/zero{stage}.json")},
        "logging": {"progress": False},
    }
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    out = str(tmp_path / f"{name}-weights")
    script = os.path.join(REPO, "tests/scripts/initial_weights.py")
    if ranks == 1:
        cmd = python_cmd("tests/scripts/initial_weights.py", path, out)
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               script, path, out]
    proc = run_cmd(cmd, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return weights(out)


@pytest.mark.multiproc
def test_from_scratch_init_is_the_same_under_every_stage(tmp_path):
    """model.config + train.seed -> the same initial weights under ZeRO-2 on 1 rank (built on the
    CPU) and ZeRO-3 on 2 ranks (built partitioned under zero.Init, each module gathered to init)."""
    zero2 = _initial_weights(tmp_path, "z2", "2", 1)
    zero3 = _initial_weights(tmp_path, "z3x2", "3", 2)
    assert zero3.keys() == zero2.keys()
    for k in zero2:
        assert torch.equal(zero2[k], zero3[k]), k


def test_init_by_name_is_the_architectures_init_and_a_function_of_the_seed():
    from llmtrain.models.loading import init_weights_by_name

    model, _ = build_tiny("llama")
    init_weights_by_name(model, seed=7, zero3=False)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)  # the global RNG state does not matter
    init_weights_by_name(model, seed=7, zero3=False)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    # the architecture's own distributions: N(0, initializer_range) matrices, RMSNorm weights at 1
    q = first["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - model.config.initializer_range) < 0.002 and abs(q.mean().item()) < 0.002
    assert torch.equal(first["model.norm.weight"], torch.ones_like(first["model.norm.weight"]))
    # modules differ from each other, and another seed gives other weights
    assert not torch.equal(q, first["model.layers.1.self_attn.q_proj.weight"])
    init_weights_by_name(model, seed=8, zero3=False)
    assert not torch.equal(q, model.state_dict()["model.layers.0.self_attn.q_proj.weight"])
