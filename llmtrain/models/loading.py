"""The model a run trains: built from model.config or loaded from a hub id / local directory, with
the objective's head, partitioned while it loads under ZeRO-3, LoRA-wrapped when asked."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..config import LoraConfig, ModelConfig
from ..errors import ConfigError
from .attention import choose_attention
from .hub import load_error

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Head:
    """What an Objective.head builds: the transformers auto class, extra config values, the PEFT task."""

    auto_class: str
    config: tuple = ()  # (name, value) pairs set on the model config (from_config and from_pretrained)
    peft_task: str = "CAUSAL_LM"  # peft.LoraConfig.task_type: which PeftModel class wraps it (and merges it)
    modules_to_save: tuple = ()  # trained fully beside a LoRA adapter (a new head has no base weights to adapt)


# Objective.head -> its Head. seq_cls: the architecture's sequence-classification class with one label
# (a scalar reward): the causal LM's trunk loads from its checkpoint, the `score` head (hidden -> 1) is new
HEADS = {
    "causal_lm": Head("AutoModelForCausalLM"),
    "seq_cls": Head("AutoModelForSequenceClassification", config=(("num_labels", 1),), peft_task="SEQ_CLS",
                    modules_to_save=("score",)),
}


def load_model(m: ModelConfig, lo: LoraConfig, seed: int, tokenizer, ds_config: dict, precision: str,
               device: torch.device, head: str = "causal_lm"):
    """Build or load the model with the objective's `head` (HEADS). Under ZeRO-3 it is partitioned while it loads.

    `HfDeepSpeedConfig` must be alive while the model is created: transformers then wraps
    creation in `deepspeed.zero.Init`, so each rank only ever materialises its own shard of
    the fp32 weights (and from_pretrained scatters checkpoint shards straight into it).
    """
    import transformers
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    spec_head = HEADS[head]
    auto_class = getattr(transformers, spec_head.auto_class)
    dtype = _DTYPES[precision]
    attn = choose_attention(m.attn_implementation, device, dtype)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    quant = {}
    if lo.qlora:
        from .lora import check_qlora, quantization_kwargs

        check_qlora(lo, device, stage)
        quant = quantization_kwargs(device)
    keep_alive = HfDeepSpeedConfig(ds_config) if stage == 3 else None  # noqa: F841
    torch.manual_seed(seed)  # from-scratch init: see init_weights_by_name
    if m.config is not None:
        spec = dict(m.config)
        model_type = spec.pop("model_type")
        spec.setdefault("vocab_size", len(tokenizer))
        spec.update(spec_head.config)
        for name in ("pad", "eos", "bos"):
            if getattr(tokenizer, f"{name}_token_id") is not None:
                spec.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
        try:
            hf_config = AutoConfig.for_model(model_type, **spec)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{m.where('model.config')}: model.config: {e}") from None
        hf_config._attn_implementation = attn
        # the RNG streams are left as train.seed set them whatever the stage consumed (dropout follows)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            model = auto_class.from_config(hf_config, dtype=dtype, attn_implementation=attn)
            init_weights_by_name(model, seed, zero3=stage == 3)
    else:
        try:
            model = auto_class.from_pretrained(
                m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                dtype=dtype, attn_implementation=attn, **quant, **dict(spec_head.config),
            )
        except ConfigError:
            raise
        except Exception as e:
            raise load_error("model.name_or_path", m.name_or_path, e) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )
    model.config.use_cache = False  # a KV cache would stop transformers isolating packed samples
    if head != "causal_lm" and model.config.pad_token_id is None:
        # HF's sequence-classification forward refuses batches > 1 without it (many checkpoints have none)
        model.config.pad_token_id = tokenizer.pad_token_id
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lo.enabled:
        from .lora import apply_lora

        model = apply_lora(model, lo, m, dtype, task_type=spec_head.peft_task,
                           extra_modules_to_save=spec_head.modules_to_save)  # base frozen: only adapter params require grad
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

    from .. import distributed as dist

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
