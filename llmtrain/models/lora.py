"""LoRA / DoRA / QLoRA through PEFT: wrap the loaded base, save the adapter, merge it into a base.

The base model stays frozen (requires_grad=False), so `engine.param_groups` hands only the
adapter (and `lora.modules_to_save`) to the optimizer: Adam state shrinks with them, and
checkpoints hold only trainable tensors. Under ZeRO-3 the base arrives partitioned by
`zero.Init`; PEFT wraps the partitioned linears (their `in/out_features` are plain
attributes) and DeepSpeed partitions the new adapter tensors in `deepspeed.initialize`
(DoRA and modules_to_save included: PEFT gathers the partitioned weights it reads).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import torch

from .. import distributed as dist
from ..config import LoraConfig, ModelConfig
from ..errors import ConfigError
from .hub import load_error
from .params import count_parameters

ADAPTER_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------- QLoRA loading


def check_qlora(lo: LoraConfig, device: torch.device, stage: int) -> None:
    """QLoRA is a CUDA + bitsandbytes feature: say so before any weight is read."""
    where = lo.where("lora.qlora")
    if device.type != "cuda":
        raise ConfigError(f"{where}: lora.qlora=true needs a CUDA GPU (bitsandbytes 4-bit), this process runs on "
                          f"{device.type}; set lora.qlora=false for plain LoRA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where}: lora.qlora=true needs bitsandbytes: pip install bitsandbytes")
    if stage == 3:
        raise ConfigError(f"{where}: lora.qlora=true is supported under ZeRO 0-2 (the 4-bit base is replicated, "
                          "only adapters are optimised); pick deepspeed.config=ds_configs/zero2.json")


def quantization_kwargs(device: torch.device) -> dict:
    """from_pretrained arguments for a 4-bit NF4 base with double quantisation and bf16 compute."""
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    # each rank holds the whole 4-bit base on its own GPU
    return {"quantization_config": bnb, "device_map": {"": device.index or 0}}


# --------------------------------------------------------------------------- wrapping


def peft_config(lo: LoraConfig, revision: str | None = None, task_type: str = "CAUSAL_LM",
                extra_modules_to_save: tuple = ()):
    """task_type: the model head's PEFT task (models.loading.HEADS): SEQ_CLS for a reward model, whose
    new `score` head (extra_modules_to_save) is trained fully and saved in the adapter."""
    from peft import LoraConfig as PeftLoraConfig

    to_save = list(lo.modules_to_save) + [n for n in extra_modules_to_save if n not in lo.modules_to_save]
    return PeftLoraConfig(
        task_type=task_type, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
        target_modules=lo.target_modules, modules_to_save=to_save or None,
        use_dora=lo.use_dora, bias="none",
        revision=revision,  # model.revision, recorded in adapter_config.json: a merge loads this base revision (PEFT's convention)
    )


def _linear_names(model: torch.nn.Module, limit: int = 8) -> list[str]:
    """Distinct leaf names of the model's linear layers (what target_modules may name)."""
    names = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Conv1D"):
            if leaf not in names:
                names.append(leaf)
    return names[:limit]


def apply_lora(model: torch.nn.Module, lo: LoraConfig, m: ModelConfig, dtype: torch.dtype,
               task_type: str = "CAUSAL_LM", extra_modules_to_save: tuple = ()) -> torch.nn.Module:
    """Base model -> PeftModel with only adapter (and modules_to_save) parameters trainable.

    `dtype` is the base's unquantised dtype: what a merged export is written in."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lo.qlora:
        # casts norms to fp32 for stability and freezes the 4-bit base
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=m.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model = get_peft_model(model, peft_config(lo, m.revision, task_type, extra_modules_to_save))
    except ValueError as e:
        msg = str(e)
        if "not found in the base model" in msg or "Target module" in msg:
            raise ConfigError(
                f"{lo.where('lora.target_modules')}: lora.target_modules={lo.target_modules!r} matches no module of "
                f"the model; linear layers it has: {', '.join(_linear_names(model))} (or use all-linear)") from None
        if "modules_to_save" in msg or "not found" in msg:
            raise ConfigError(f"{lo.where('lora.modules_to_save')}: {msg.splitlines()[0]}") from None
        raise
    if lo.modules_to_save:
        _check_modules_to_save(model, lo)
    if m.gradient_checkpointing:
        # checkpointed blocks see frozen embeddings: without an input that requires grad,
        # recomputation would drop the adapter gradients
        model.enable_input_require_grads()
    # read by export.export_hf, which sees only the engine
    model.llmtrain_export = {"merge": lo.merge, "dtype": dtype, "trust_remote_code": m.trust_remote_code}
    trainable, total = count_parameters(model)
    dist.print0(f"lora: r={lo.r} alpha={lo.alpha:g}{' DoRA' if lo.use_dora else ''}{' on a 4-bit base' if lo.qlora else ''}: "
                f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    return model


def _check_modules_to_save(model, lo: LoraConfig) -> None:
    wrapped = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if type(mod).__name__ == "ModulesToSaveWrapper"}
    missing = [n for n in lo.modules_to_save if n.rsplit(".", 1)[-1] not in wrapped]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.base_model.model.named_children()} |
                       {"embed_tokens", "lm_head"} & {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()})
        raise ConfigError(f"{lo.where('lora.modules_to_save')}: lora.modules_to_save {missing} match no module of "
                          f"the model (e.g. {', '.join(names)})")


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


# --------------------------------------------------------------------------- export


def save_adapter(model, state_dict: dict, out_dir: str) -> None:
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


def merge_into_base(adapter_dir: str, out_dir: str, base: str | None = None, dtype=None,
                    revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Load `base` (default: the adapter's base_model_name_or_path, at the revision its
    adapter_config.json records), apply the adapter, merge, and write a full safetensors model
    (+ the adapter's tokenizer, else the base's) to out_dir. `revision` overrides the recorded
    one; `trust_remote_code` is needed for a base whose model code ships with it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _MERGE_CLASSES = {"CAUSAL_LM": (AutoModelForCausalLM, {}),
                      "SEQ_CLS": (AutoModelForSequenceClassification, {"num_labels": 1})}  # a scalar reward model

    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"--adapter: {adapter_dir} holds no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    with open(cfg_path) as f:
        adapter_cfg = json.load(f)
    recorded = adapter_cfg.get("base_model_name_or_path")
    base = base or recorded
    if not base:
        raise ConfigError(f"--adapter: {cfg_path} names no base model; pass --base PATH")
    if revision is None and base == recorded:
        revision = adapter_cfg.get("revision")  # the revision the adapter was trained on
    load_args = {"revision": revision, "trust_remote_code": trust_remote_code}
    # the adapter's task picks the head: a SEQ_CLS (reward) adapter merged into a causal LM would load
    # without an error and silently drop its trained score head
    auto_class, head_args = _MERGE_CLASSES.get(adapter_cfg.get("task_type") or "CAUSAL_LM", (AutoModelForCausalLM, {}))
    try:
        model = auto_class.from_pretrained(base, dtype=dtype or "auto", **head_args, **load_args)
    except Exception as e:
        raise load_error("--base", base, e, "--trust-remote-code (model.trust_remote_code=true in a run)") from None
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:
        first = _shape_error(str(e)) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--base: the adapter in {adapter_dir} does not fit base {base!r}: {first}") from None
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    own_tokenizer = os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json"))
    tok_src, tok_args = (adapter_dir, {}) if own_tokenizer else (base, load_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_src, **tok_args)
    except Exception:  # a base without tokenizer files: the weights are still the point
        tokenizer = None
    if head_args and merged.config.pad_token_id is None and tokenizer is not None:
        merged.config.pad_token_id = tokenizer.pad_token_id  # as training set it (models.loading)
    merged.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _shape_error(msg: str) -> str | None:
    """torch's multi-line 'size mismatch for X: copying a param with shape A ... shape B' -> one line."""
    for line in msg.splitlines():
        line = line.strip()
        if line.startswith("size mismatch"):
            return line
    return None
