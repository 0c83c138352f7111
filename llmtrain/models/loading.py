"""Tokenizer and model loading: hub id, local directory or from-scratch config; attention choice; ZeRO-3 init."""
from __future__ import annotations

import hashlib
import os

import torch

from .config import Config, ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") > 1


def _load_error(key: str, path: str, err: Exception, remote_code_switch: str = "model.trust_remote_code=true") -> ConfigError:
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        return ConfigError(f"{key}: directory {path!r} not found (give a local model directory or a hub id)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "contains custom code" in first:  # transformers' refusal names no switch
        first = f"it ships its own model code; set {remote_code_switch} if you trust that code"
    return ConfigError(f"{key}: cannot load {path!r}: {first}")


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    from .data.chat import ensure_chat_template

    m = cfg.model
    path = m.tokenizer or m.name_or_path
    key = "model.tokenizer" if m.tokenizer else "model.name_or_path"
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise _load_error(key, path, e) from None
    if not tok.is_fast:
        raise ConfigError(f"{key}: {path!r} has no fast (Rust) tokenizer; assistant masking needs character offsets")
    if tok.pad_token_id is None:
        # padded positions carry IGNORE_INDEX labels and sit after real tokens: any id will do
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok, m.chat_template)
    return tok


def tokenizer_hash(tok) -> str:
    """Identity of the vocabulary + template: checked on resume and against prepared shards."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update((tok.chat_template or "").encode())
    return h.hexdigest()[:16]


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto: flash_attention_2 on CUDA when flash-attn is installed and the weights are bf16/fp16,
    else sdpa (the CPU path). The flash-attn kernels take only fp16/bf16 inputs: with fp32 weights
    transformers hands them fp32 and the kernel fails on the first forward, so that choice is a
    config error here instead.

    Test hook: LLMTRAIN_FLASH_REFERENCE=1 lets an explicit flash_attention_2 run where the kernel
    is missing (a CPU) on the pure-PyTorch kernels of `llmtrain.flash_reference`; everything else
    on the flash path (transformers' flash wrapper, our varlen kwargs) runs for real.
    """
    from . import flash_reference

    half = dtype in (torch.bfloat16, torch.float16)
    if requested == "auto":
        return "flash_attention_2" if half and flash_reference.real_kernel_available(device) else "sdpa"
    if requested == "flash_attention_2":
        if not flash_reference.real_kernel_available(device):
            if not flash_reference.install_if_requested(device):
                raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and "
                                  "`pip install flash-attn`; use auto or sdpa")
            from . import dist

            dist.print0(f"attention: flash_attention_2 on the pure-PyTorch reference kernels "
                        f"({flash_reference.ENV_SWITCH}=1; slow, for tests and debugging)")
        if not half:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs train.precision=bf16 or fp16 "
                              "(the flash-attn kernels take no fp32); use sdpa for fp32")
    return requested


def load_model(cfg: Config, tokenizer, ds_config: dict, precision: str, device: torch.device):
    """Build or load the causal LM. Under ZeRO-3 it is partitioned while it loads.

    `HfDeepSpeedConfig` must be alive while the model is created: transformers then wraps
    creation in `deepspeed.zero.Init`, so each rank only ever materialises its own shard of
    the fp32 weights (and from_pretrained scatters checkpoint shards straight into it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from .engine import zero_stage

    m = cfg.model
    dtype = _DTYPES[precision]
    attn = choose_attention(m.attn_implementation, device, dtype)
    stage = zero_stage(ds_config)
    quant = {}
    if cfg.lora.qlora:
        from .lora import check_qlora, quantization_kwargs

        check_qlora(cfg, device, stage)
        quant = quantization_kwargs(cfg, device)
    keep_alive = HfDeepSpeedConfig(ds_config) if stage == 3 else None  # noqa: F841
    torch.manual_seed(cfg.train.seed)  # from-scratch init: see init_weights_by_name
    if m.config is not None:
        spec = dict(m.config)
        model_type = spec.pop("model_type")
        spec.setdefault("vocab_size", len(tokenizer))
        for name in ("pad", "eos", "bos"):
            if getattr(tokenizer, f"{name}_token_id") is not None:
                spec.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
        try:
            hf_config = AutoConfig.for_model(model_type, **spec)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{cfg.where('model.config')}: model.config: {e}") from None
        hf_config._attn_implementation = attn
        # the RNG streams are left as train.seed set them whatever the stage consumed (dropout follows)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
            init_weights_by_name(model, cfg.train.seed, zero3=stage == 3)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                dtype=dtype, attn_implementation=attn, **quant,
            )
        except ConfigError:
            raise
        except Exception as e:
            raise _load_error("model.name_or_path", m.name_or_path, e) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )
    model.config.use_cache = False  # a KV cache would stop transformers isolating packed samples
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from .lora import apply_lora

        model = apply_lora(model, cfg, dtype)  # base frozen: only adapter params require grad
    return model


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def init_weights_by_name(model: torch.nn.Module, seed: int, zero3: bool) -> None:
    """Re-initialise a from-scratch model so its weights are a function of (train.seed, module
    name) only, the same under every ZeRO stage and world size.

    transformers draws the initial weights from one RNG stream whose consumption differs by stage:
    ZeRO 0-2 build the model on the CPU (torch's constructors draw first, then `_init_weights`),
    ZeRO-3 under zero.Init skips the constructors and initialises on rank 0's device. Here every
    module runs the model's own `_init_weights` (same distributions) with the CPU generator seeded
    from its qualified name, on CPU copies of its tensors. Under ZeRO-3 one module's parameters
    at a time are gathered (a collective: every rank walks the same modules) and rank 0's values
    are scattered back, so the whole model is never materialised on one rank.
    """
    import contextlib

    from transformers.initialization import guard_torch_init_functions
    from transformers.modeling_utils import PreTrainedModel

    from . import dist

    for t in list(model.parameters()) + list(model.buffers()):
        if hasattr(t, "_is_hf_initialized"):  # e.g. tied weights: HF's init functions would skip them
            del t._is_hf_initialized

    def visit(module: torch.nn.Module, name: str, init_fn) -> None:
        for child_name, child in module.named_children():  # children first, as transformers does
            visit(child, f"{name}.{child_name}" if name else child_name,
                  child._init_weights if isinstance(child, PreTrainedModel) else init_fn)
        # _init_weights may also write its direct children's tensors (e.g. module.q_proj.weight)
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for child in module.children():
            if not isinstance(child, PreTrainedModel):
                tensors += [*child.parameters(recurse=False), *child.buffers(recurse=False)]
        tensors = list({id(t): t for t in tensors}.values())  # a tied weight once
        params = [t for t in tensors if isinstance(t, torch.nn.Parameter)]
        if zero3 and params:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            if zero3 and not dist.is_main():
                return
            originals = [t.data for t in tensors]
            for t in tensors:  # CPU copies: the same CPU generator stream whatever device holds them
                t.data = t.data.to("cpu", copy=True)
            torch.manual_seed(_module_seed(seed, name))
            init_fn(module)
            for t, original in zip(tensors, originals):
                original.copy_(t.data)
                t.data = original

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, "", model._init_weights)
    model.tie_weights()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), correct under ZeRO-3 where local tensors are empty shards."""
    def numel(p):
        quant = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: two weights per stored byte
        if quant is not None:
            return int(torch.Size(quant.shape).numel())
        return getattr(p, "ds_numel", p.numel())

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
