"""GPU fast paths behind explicit switches: off = untouched model; on CPU a clear error, or the
switch's path run on CPU with only the kernel / CUDA library stood in for; GPU-only equalities are
marked `gpu` and skipped without CUDA. flash_attention_2 has its own file, test_flash_packed.py
(reference kernels on CPU, the real ones on CUDA)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

from conftest import REPO, build_tiny
from llmtrain.config import Config, ConfigError
from llmtrain.models.fastpaths import apply_fast_paths, decoder_layers
from llmtrain.losses import causal_lm_loss
from llmtrain.objectives.lm_forward import lm_forward_logps

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
    assert apply_fast_paths(model, Config().model, torch.device("cpu")) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(decoder_layers(model)) == model.config.num_hidden_layers


def test_liger_without_cuda_is_a_one_line_config_error():
    cfg = Config()
    cfg.model.liger = True
    model, _ = build_tiny("llama")
    with pytest.raises(ConfigError, match="model.liger=true needs a CUDA GPU") as e:
        apply_fast_paths(model, cfg.model, torch.device("cpu"))
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
    compiled_model = apply_fast_paths(model, cfg.model, torch.device("cpu"))
    compiled = _loss_sum(compiled_model, packed)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for n, p in compiled_model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-3, atol=1e-5, msg=n)


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
        liger = _loss_sum(apply_fast_paths(model, cfg.model, torch.device("cuda")), packed)
    torch.testing.assert_close(liger, eager, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- CPU runs of the GPU-only paths
# Each runs every line of llmtrain's code on the path; only the compiled kernel or CUDA library is
# stood in for (tests/stand_ins/: pure-PyTorch liger_kernel, an importable bitsandbytes), and the
# CUDA device is a torch.device("cuda") object that llmtrain only inspects, never touches.

STAND_INS = os.path.join(REPO, "tests", "stand_ins")
CUDA = torch.device("cuda")


@pytest.fixture
def liger_stand_in(monkeypatch):
    """tests/stand_ins/liger_kernel importable for one test (in place of a real one, if any)."""
    for name in [m for m in sys.modules if m.split(".")[0] == "liger_kernel"]:
        monkeypatch.delitem(sys.modules, name)  # a real liger-kernel comes back afterwards
    monkeypatch.syspath_prepend(STAND_INS)
    from liger_kernel import transformers as liger

    assert liger.__file__.startswith(STAND_INS)
    yield liger
    for name in [m for m in sys.modules if m.split(".")[0] == "liger_kernel"]:
        del sys.modules[name]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = _loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_lora", [False, True])
def test_liger_path_patches_the_base_model_and_keeps_loss_and_grads(liger_stand_in, with_lora):
    liger = liger_stand_in
    model, tok = build_tiny("llama")
    model.eval()
    if with_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    packed, _ = _packed_and_unpacked(len(tok))
    eager_loss, eager_grads = _loss_and_grads(model, packed)
    cfg = Config()
    cfg.model.liger = True
    assert apply_fast_paths(model, cfg.model, CUDA) is model
    # llmtrain keeps its own log-prob head: no Liger cross-entropy; under PEFT the base model is patched
    (call,) = liger.calls[-1:]
    assert call["cross_entropy"] is False and call["fused_linear_cross_entropy"] is False
    assert call["model"] is (model.get_base_model() if with_lora else model)
    before = dict(liger.runs)
    liger_loss, liger_grads = _loss_and_grads(model, packed)
    layers = model.config.num_hidden_layers
    assert liger.runs["rms_norm"] - before["rms_norm"] == 2 * layers + 1  # the patched modules ran
    assert liger.runs["swiglu"] - before["swiglu"] == layers
    torch.testing.assert_close(liger_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert liger_grads.keys() == eager_grads.keys()
    for n in eager_grads:
        torch.testing.assert_close(liger_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_liger_without_the_package_is_a_one_line_config_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real_find_spec(n, *a))
    cfg = Config()
    cfg.model.liger = True
    model, _ = build_tiny("llama")
    with pytest.raises(ConfigError, match="needs liger-kernel: `pip install liger-kernel`") as e:
        apply_fast_paths(model, cfg.model, CUDA)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_compiled_layers_with_a_stand_in_backend_keep_packed_loss_and_grads(monkeypatch, attn):
    """apply_compile compiles every decoder layer in place; dynamo traces them with our inputs
    (position_ids; on flash the varlen kwargs, whose max lengths are Python ints), over micro-batches
    of different shapes. Only inductor's code generation is replaced, by the `eager` backend
    (test_compiled_model_gives_the_eager_loss_and_grads runs inductor itself, marked slow)."""
    from llmtrain.models import flash_reference
    from llmtrain.data.batching import collate_sequences

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: real_compile(*a, **{"backend": "eager", **k}))
    torch._dynamo.reset()
    if attn == "flash_attention_2" and not flash_reference.real_kernel_available():
        flash_reference.install()
    try:
        model, tok = build_tiny("llama")
        if attn != "sdpa":  # same weights on the flash path, in bf16 as flash-attn runs
            model = model.to(torch.bfloat16)
            model.config._attn_implementation = attn
        model.eval()
        g = np.random.default_rng(0)
        seqs = [(ids, ids) for ids in (g.integers(3, len(tok), n).astype(np.int32) for n in (9, 4, 12, 6, 7, 3, 10, 5, 8))]
        rows = ([seqs[:2], seqs[2:3]], [seqs[3:6], seqs[6:7]], [seqs[7:9], seqs[:1]])  # packed; 3 shapes, 3 max lengths
        batches = [collate_sequences(r, tok.pad_token_id) for r in rows]
        eager = [_loss_and_grads(model, b) for b in batches]
        names = [n for n, _ in model.named_parameters()]
        cfg = Config()
        cfg.model.compile = True
        compiled_model = apply_fast_paths(model, cfg.model, torch.device("cpu"))
        assert [n for n, _ in compiled_model.named_parameters()] == names  # in place: names DeepSpeed sees
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled_model))
        graphs = []
        for batch, (loss, grads) in zip(batches, eager):
            got_loss, got_grads = _loss_and_grads(compiled_model, batch)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
            for n in grads:  # the eager backend runs the same kernels: equal up to summation order
                torch.testing.assert_close(got_grads[n].float(), grads[n].float(), rtol=1e-2, atol=1e-4, msg=n)
        # shapes and max lengths that change every batch do not recompile every batch
        assert graphs[2] == graphs[1], graphs
    finally:
        flash_reference.uninstall()
        torch._dynamo.reset()


def test_qlora_path_runs_on_cpu_with_bitsandbytes_stood_in(tiny_model_dir, monkeypatch, capsys):
    """check_qlora, quantization_kwargs, load_model's QLoRA branch, apply_lora's k-bit preparation
    and the 4-bit parameter count. Stood in for: bitsandbytes' presence (for llmtrain.lora's check
    only: PEFT and transformers would import a fake one) and the 4-bit load itself
    (transformers + bitsandbytes): from_pretrained records the quantization arguments and loads bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtrain.models import lora
    from llmtrain.models.lora import check_qlora, quantization_kwargs
    from llmtrain.models.loading import load_model
    from llmtrain.models.params import count_parameters

    cfg = Config()
    cfg.model.name_or_path = tiny_model_dir
    cfg.lora.enabled, cfg.lora.qlora, cfg.lora.r, cfg.lora.dropout = True, True, 4, 0.0
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_qlora(cfg.lora, torch.device("cpu"), 2)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="needs bitsandbytes: pip install bitsandbytes"):
            check_qlora(cfg.lora, CUDA, 2)
        spec = importlib.machinery.ModuleSpec("bitsandbytes", None)
        finder = types.SimpleNamespace(find_spec=lambda n, *a: spec if n == "bitsandbytes" else importlib.util.find_spec(n, *a))
        monkeypatch.setattr(lora, "importlib", types.SimpleNamespace(util=finder))
    with pytest.raises(ConfigError, match="not supported|supported under ZeRO 0-2"):
        check_qlora(cfg.lora, CUDA, 3)
    check_qlora(cfg.lora, CUDA, 2)
    quant = quantization_kwargs(torch.device("cuda", 1))
    bnb = quant["quantization_config"]
    assert quant["device_map"] == {"": 1}
    assert (bnb.load_in_4bit, bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant,
            bnb.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)

    seen = {}
    real_from_pretrained = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained_4bit_stand_in(cls, path, *args, quantization_config=None, device_map=None, **kw):
        seen.update(quantization_config=quantization_config, device_map=device_map, dtype=kw.get("dtype"))
        return real_from_pretrained(cls, path, *args, **kw)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained_4bit_stand_in))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg.model, cfg.lora, cfg.train.seed, tok, {"zero_optimization": {"stage": 2}}, "bf16", CUDA)
    assert "on a 4-bit base" in capsys.readouterr().out
    assert seen["quantization_config"].load_in_4bit and seen["device_map"] == {"": 0}
    assert seen["dtype"] == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"  # no flash-attn here: auto falls back
    # k-bit preparation froze the base and upcast what stays unquantised; only adapters train
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    assert model.llmtrain_export == {"merge": False, "dtype": torch.bfloat16, "trust_remote_code": False}
    packed, _ = _packed_and_unpacked(len(tok))
    _loss_sum(model, packed).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # a 4-bit weight stores two values per byte; the count reads the real shape from quant_state
    lin = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    full = lin.weight.numel()
    packed_weight = torch.nn.Parameter(torch.zeros(full // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed_weight.quant_state = types.SimpleNamespace(shape=lin.weight.shape)
    before = count_parameters(model)
    lin.weight = packed_weight
    assert count_parameters(model) == before
