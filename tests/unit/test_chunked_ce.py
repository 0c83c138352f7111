"""Chunked LM head + cross-entropy (train.loss_chunk_tokens) inside the real forward path:
same loss and gradients as the full-logits path, in-process and under 2-rank ZeRO-3."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import BIN, REPO, TINY, TOKENIZER, base_recipe, build_tiny, run_cmd, train_losses, write_recipe, free_port
from llmtrain.config import ConfigError
from llmtrain.losses import causal_lm_loss
from llmtrain.objectives.lm_forward import lm_forward_logps


class _Engine:
    """Stands in for the DeepSpeed engine: `engine.module` is the model, calling it forwards."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)


def _batch(vocab: int, rows: int = 2, length: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, -7:] = -100  # padding
    # two packed samples in row 0: positions restart at 10
    pos = torch.arange(length).repeat(rows, 1)
    pos[0, 10:] = torch.arange(length - 10)
    labels[0, 10] = -100
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def _loss_and_grads(model, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    token_logps, targets = lm_forward_logps(_Engine(model), batch, chunk_tokens)
    loss, _ = causal_lm_loss(token_logps, targets, int((targets != -100).sum()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), token_logps.detach(), grads


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", True)])
def test_chunked_ce_equals_full_logits_loss_and_grads(arch, tied):
    model, tok = build_tiny(arch)
    model.eval()  # no dropout (GPT-2 has it): both paths must see the same network; grads still flow
    if arch != "gpt2":
        model.config.tie_word_embeddings = tied
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    batch = _batch(len(tok))
    full_loss, full_logps, full_grads = _loss_and_grads(model, batch, 0)
    for chunk in (7, 16, 1000):  # uneven last chunk, several chunks, one chunk
        loss, logps, grads = _loss_and_grads(model, batch, chunk)
        torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logps, full_logps, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is restored after the call


def test_chunked_ce_refuses_post_processed_logits():
    model, tok = build_tiny("llama")
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are changed after the head
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        lm_forward_logps(_Engine(model), _batch(len(tok)), 8)


# both runs in one 2-rank launch: process start-up (imports) costs more than the runs themselves
_TWO_RUNS = """
import sys
from llmtrain import distributed as dist
from llmtrain.config import load_config
from llmtrain.train.runner import run_task
from llmtrain.objectives import OBJECTIVES
recipe, out = sys.argv[1], sys.argv[2]
for chunk in (0, 16):
    cfg = load_config(recipe, [f"train.loss_chunk_tokens={chunk}", f"output_dir={out}/chunk{chunk}"])
    run_task(cfg, OBJECTIVES["sft"].from_config(cfg))
dist.shutdown()
"""


@pytest.mark.multiproc
def test_chunked_ce_matches_unchunked_under_zero3_two_ranks(tmp_path):
    """ZeRO-3 partitions the (tied) LM-head weight: the head's hooks must gather it for our chunks,
    in forward and again in backward. Equal losses at steps 2-3 also mean equal updates."""
    recipe = base_recipe(tmp_path, None, max_steps=3)
    recipe["deepspeed"]["config"] = os.path.join(REPO, "ds_configs/zero3.json")
    # tied embeddings: the head's weight is the (partitioned) input embedding
    recipe["model"] = {"tokenizer": TOKENIZER, "config": {**TINY["llama"], "tie_word_embeddings": True}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    script = tmp_path / "two_runs.py"
    script.write_text(_TWO_RUNS)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), path,
           str(tmp_path / "runs")]
    proc = run_cmd(cmd, timeout=240, env={"PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    full, chunked = (train_losses(str(tmp_path / "runs" / f"chunk{c}")) for c in (0, 16))
    assert len(full) == 3
    assert chunked == pytest.approx(full, rel=1e-5, abs=1e-6)
