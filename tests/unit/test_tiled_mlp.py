"""parallel.tiled_mlp_shards (DeepSpeed's TiledMLP per MLP instance): the same loss and gradients as the
untiled model, a fixed number of tiles whatever the row length (ZeRO-3 needs equal calls on every rank),
and one-line config errors. The 2-rank ZeRO-3 run is in tests/integration/test_parallel.py."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import REPO, build_tiny
from llmtrain.config import ConfigError, ParallelConfig, load_config
from llmtrain.models.tiled_mlp import apply_tiled_mlp

DEBUG_SFT = os.path.join(REPO, "recipes/debug/sft.yaml")


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("seq", [2, 4, 7])  # fewer rows than tiles; torch.chunk(4, 3) gives 2 pieces; 7 % 3 != 0
def test_tiled_llama_matches_untiled_loss_and_grads(seq):
    ref, _ = build_tiny("llama")
    tiled, _ = build_tiny("llama")  # same seed: same weights
    ref.float(), tiled.float()
    assert apply_tiled_mlp(tiled, ParallelConfig(tiled_mlp_shards=3)) == 2  # one MLP per decoder layer
    calls = []  # gate_proj calls per step: 3 tiles in forward + 3 recomputed in backward, for every length
    for layer in tiled.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, 200, (2, seq), generator=torch.Generator().manual_seed(seq))  # batch 2: backward tiles B*S
    loss_ref, grads_ref = _loss_and_grads(ref, ids)
    loss_tiled, grads_tiled = _loss_and_grads(tiled, ids)
    assert len(calls) == 2 * (3 + 3), len(calls)
    torch.testing.assert_close(loss_tiled, loss_ref, rtol=1e-5, atol=0)
    assert grads_tiled.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_tiled[name], g, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # eval: forward only, no backward recomputation
        torch.testing.assert_close(tiled(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_config_errors():
    with pytest.raises(ConfigError, match=r"parallel.tiled_mlp_shards=-1 must be >= 0 \(0 = off\)"):
        load_config(DEBUG_SFT, ["parallel.tiled_mlp_shards=-1"])
    with pytest.raises(ConfigError, match="must be 0 with parallel.tensor_parallel_size>1"):
        load_config(DEBUG_SFT, ["parallel.tiled_mlp_shards=2", "parallel.tensor_parallel_size=2"])
    gpt2, _ = build_tiny("gpt2")  # its MLP is c_fc/c_proj: refused in one line, nothing patched
    with pytest.raises(ConfigError, match="needs decoder MLPs with gate_proj/up_proj/down_proj .* the gpt2 model has"):
        apply_tiled_mlp(gpt2, ParallelConfig(tiled_mlp_shards=2))
    assert apply_tiled_mlp(gpt2, ParallelConfig()) == 0  # 0 = off: no check, no patch
