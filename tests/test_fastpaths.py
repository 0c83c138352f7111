"""GPU fast paths behind explicit switches: off = untouched model; on CPU a clear error or the
tested CPU path; GPU-only equalities are marked `gpu` and skipped without CUDA."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import build_tiny
from llmtrain.config import Config, ConfigError
from llmtrain.fastpaths import apply_fast_paths, decoder_layers
from llmtrain.losses import causal_lm_loss
from llmtrain.tasks import lm_forward_logps

needs_flash_attn = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU and flash-attn")


class _Engine:
    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)


def _packed_and_unpacked(vocab: int, lengths=(9, 14), device="cpu"):
    """Two samples packed in one row (position_ids restart) and the same samples one per row."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    packed_labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])  # boundary label masked
    packed = {"input_ids": torch.cat(seqs)[None], "labels": packed_labels[None],
              "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
    singles = [{"input_ids": s[None], "labels": s[None], "position_ids": torch.arange(len(s))[None]} for s in seqs]
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    return move(packed), [move(b) for b in singles]


def _loss_sum(model, batch) -> torch.Tensor:
    token_logps, targets = lm_forward_logps(_Engine(model), batch)
    return causal_lm_loss(token_logps, targets, 1)[0]


def test_fast_paths_off_return_the_model_untouched():
    model, _ = build_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_fast_paths(model, Config(), torch.device("cpu")) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(decoder_layers(model)) == model.config.num_hidden_layers


def test_liger_without_cuda_is_a_one_line_config_error():
    cfg = Config()
    cfg.model.liger = True
    model, _ = build_tiny("llama")
    with pytest.raises(ConfigError, match="model.liger=true needs a CUDA GPU") as e:
        apply_fast_paths(model, cfg, torch.device("cpu"))
    assert "\n" not in str(e.value)


@pytest.mark.slow  # inductor's first CPU compile takes 30-60 s on 2 cores
def test_compiled_model_gives_the_eager_loss_and_grads():
    model, tok = build_tiny("llama")
    model.eval()
    packed, _ = _packed_and_unpacked(len(tok))
    eager = _loss_sum(model, packed)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cfg = Config()
    cfg.model.compile = True
    compiled_model = apply_fast_paths(model, cfg, torch.device("cpu"))
    compiled = _loss_sum(compiled_model, packed)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for n, p in compiled_model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.gpu
@needs_flash_attn
def test_packed_equals_unpacked_with_flash_attention_2():
    """flash-attn varlen from position_ids: packed samples never attend across the boundary."""
    model, tok = build_tiny("llama")
    model = model.to("cuda", torch.bfloat16).eval()
    model.config._attn_implementation = "flash_attention_2"
    packed, singles = _packed_and_unpacked(len(tok), device="cuda")
    with torch.no_grad():
        packed_loss = _loss_sum(model, packed)
        unpacked_loss = sum(_loss_sum(model, b) for b in singles)
    torch.testing.assert_close(packed_loss.float(), unpacked_loss.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs a CUDA GPU and liger-kernel")
def test_liger_gives_the_eager_loss_on_gpu():
    model, tok = build_tiny("llama")
    model = model.to("cuda", torch.float32).eval()
    packed, _ = _packed_and_unpacked(len(tok), device="cuda")
    with torch.no_grad():
        eager = _loss_sum(model, packed)
        cfg = Config()
        cfg.model.liger = True
        liger = _loss_sum(apply_fast_paths(model, cfg, torch.device("cuda")), packed)
    torch.testing.assert_close(liger, eager, rtol=1e-3, atol=1e-3)
