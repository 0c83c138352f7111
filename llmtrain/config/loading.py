"""Typed run configuration: recipe YAML + dotted `key=value` overrides -> `Config`.

Every field a user can set lives here, with its unit and meaning. Loading is strict: an
unknown key, a wrong type or an impossible value is a `ConfigError` whose one-line
message names the file, line and key and says how to fix it.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user mistake in a recipe, an override or a file it names: printed as one line."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # HF hub id or local model directory; absent: build from `config`
    config: Optional[dict] = None  # from-scratch architecture: {model_type: llama, hidden_size: ..., ...}
    tokenizer: Optional[str] = None  # tokenizer hub id / directory; default: name_or_path
    revision: Optional[str] = None  # hub revision (branch, tag or commit) for name_or_path
    trust_remote_code: bool = False  # run model code shipped with a hub repo (only if you trust it)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 (auto: flash-attn on CUDA if installed)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    chat_template: Optional[str] = None  # jinja template or path to a .jinja file; default: the tokenizer's, else ChatML
    liger: bool = False  # (GPU) Liger fused kernels; requires liger-kernel
    compile: bool = False  # torch.compile the model


@dataclass
class SourceConfig:
    path: str  # file, glob or saved HF dataset directory (pretrain: a prepared token-shard directory)
    format: str = "auto"  # auto | messages | sharegpt | alpaca | preference | text | shards
    weight: float = 1.0  # relative sampling weight when several sources are mixed
    text_field: str = "text"  # column holding raw text (format: text; pretrain: read by launch/prepare.py)
    # pretrain: raw files/globs/dataset dirs (or a hub dataset) that `launch/prepare.py` tokenizes
    # into the shard directory `path` (absent: `path` is already prepared)
    prepare_from: Optional[Union[str, list]] = None
    # hub datasets (a hub id such as HuggingFaceH4/ultrachat_200k, or a local folder laid out like a
    # hub dataset repository), read with datasets.load_dataset; pretrain: these describe prepare_from
    name: Optional[str] = None  # subset (load_dataset's `name`, the dataset card's config_name)
    split: Optional[str] = None  # split to read (default: train); also picks a split of a saved DatasetDict
    revision: Optional[str] = None  # hub branch, tag or commit: pin it so a rerun reads the same rows
    columns: Optional[dict] = None  # {our field: dataset column}, e.g. {messages: conversation}
    streaming: bool = False  # pretrain prepare_from only: stream the hub dataset instead of downloading it first


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # training sources: paths/globs/dataset dirs or {path, format, weight}
    eval: list = field(default_factory=list)  # held-out sources, same form; empty: none (or eval_fraction)
    eval_fraction: float = 0.0  # share of train rows held out for eval when `eval` is empty (0 = no eval split)
    max_seq_len: int = 2048  # tokens per sample (unpacked) or per row (packed)
    packing: bool = False  # padding-free packing: several samples per row, position_ids restart per sample
    truncation: Literal["truncate", "drop"] = "truncate"  # what to do with a sample longer than max_seq_len
    max_bad_fraction: float = 0.001  # share of malformed rows skipped (and reported) before the run aborts
    max_prompt_len: int = 1024  # DPO: a longer prompt (tokens, template included) is skipped and counted
    train_reasoning: bool = True  # train assistant reasoning (reasoning_content / <think>) where the template renders it
    template_date: str = "2024-07-26"  # "today" for chat templates that print the date (Llama 3.x, gpt-oss): fixed
    # SFT/DPO preparation (tokenization into memory-mapped chunks, once, reused by later runs)
    cache_dir: Optional[str] = None  # prepared data; default output_dir/cache; content-keyed, safe to share between runs
    prepare_workers: int = 0  # tokenizer processes per rank (0 = this rank's share of the node's CPUs)
    prepare_chunk_rows: int = 4096  # most rows per chunk (the unit of parallel work, resume and atomic writes)
    prepare_timeout_minutes: float = 240.0  # how long a rank waits for chunks other ranks are preparing


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps to run; the LR schedule is defined over them
    seed: int = 42  # one seed for init, data order and dropout
    micro_batch_size: int = 1  # sequences (or packed rows) per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # final LR as a fraction of `lr` (cosine / linear schedules)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to `lr` (above max_steps: clamped to it, with a notice)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.95  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float = 1.0  # global gradient-norm clip (0 = no clipping)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    save_every: int = 0  # checkpoint interval in optimizer steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept; older complete ones are deleted (newest is never deleted)
    eval_every: int = 0  # eval interval in optimizer steps (0 = never; an eval also runs at the end if eval data)
    eval_max_batches: int = 0  # micro-batches per rank per eval (0 = the whole eval set)
    log_every: int = 1  # optimizer steps between metrics rows (each log step syncs the device once)
    resume: str = "auto"  # auto | never | path of a checkpoint directory
    resume_force: bool = False  # resume even if data, tokenizer or global batch changed (no longer exact)
    # convert a checkpoint of another run (outside output_dir/checkpoints, or another run identity) to the
    # universal format when resuming it at another world size under ZeRO 1-3
    resume_allow_foreign: bool = False
    loss_chunk_tokens: int = 0  # tokens per chunk for the LM head + cross-entropy (0 = unchunked)
    max_skipped_steps: int = 10  # consecutive non-finite steps skipped before the run aborts
    requeue_on_signal: bool = False  # under Slurm: after a SIGUSR1/SIGTERM checkpoint, `scontrol requeue` the job


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"  # ZeRO / offload / communication settings (JSON)


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"  # offline: a local run dir under output_dir/wandb
    project: str = "llmtrain"  # wandb project
    name: Optional[str] = None  # run name; default: basename of output_dir
    entity: Optional[str] = None  # wandb team/user; default: your wandb default


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress bar on rank 0 (step, loss, tokens/s, ETA)


@dataclass
class DistConfig:
    timeout_minutes: float = 30.0  # collective-operation timeout: a missing rank fails instead of hanging
    # how long ranks wait for one rank's file work outside any collective (universal-checkpoint conversion,
    # final/ export and LoRA merge) before failing with one line; hours: these scale with the model size
    wait_minutes: float = 240.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL anchor to the reference model
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO (Rafailov 2023), IPO (Azar 2023), hinge (SLiC)
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped preference labels
    precompute_ref: bool = False  # compute reference log-probs once before training (no ref model in memory)
    # RPO (Pang 2024; TRL rpo_alpha): add nll_weight x the chosen response's per-token NLL to the loss
    nll_weight: float = 0.0
    # dropout off in the policy (the reference always runs in eval mode): DPO compares log-probs of
    # policy and reference on the same sequences, and dropout noise in one of them biases the margin
    # (and breaks loss = ln 2 at step 0). LoRA adapter dropout (lora.dropout) is kept.
    disable_dropout: bool = True


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters on a frozen base (any task); only adapter params get optimizer state
    r: int = 16  # adapter rank: trainable params per adapted matrix = r x (in + out features)
    alpha: float = 32.0  # LoRA scaling numerator: the update is (alpha / r) x B @ A
    dropout: float = 0.05  # dropout on the adapter's input (0 = none)
    # module names to adapt (suffixes such as [q_proj, v_proj]) or "all-linear": every linear layer but the LM head
    target_modules: Union[str, list] = "all-linear"
    # modules trained fully and saved beside the adapter, e.g. [embed_tokens, lm_head] after adding tokens
    modules_to_save: list = field(default_factory=list)
    use_dora: bool = False  # DoRA (Liu 2024): magnitude/direction split; slower per step, often closer to full FT
    merge: bool = False  # also write final/merged/: the base with the adapter merged in (full safetensors model)
    qlora: bool = False  # (CUDA GPU + bitsandbytes) base in 4-bit NF4 with double quantisation, bf16 compute


@dataclass
class Config:
    output_dir: str = "runs/default"  # where everything of a run goes
    overwrite_output_dir: bool = False  # allow reusing an output_dir holding another run (train.resume=never)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # where each key came from ("recipe.yaml:12" or "override"), for error messages
    origins: dict = field(default_factory=dict, repr=False, compare=False)
    # one-line notices about values adjusted while loading (printed once by rank 0 at startup)
    notices: list = field(default_factory=list, repr=False, compare=False)

    def where(self, key: str) -> str:
        return self.origins.get(key, key)


# --------------------------------------------------------------------------- loading


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (for file:line errors)."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.setdefault("__lines__", {})[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(obj):
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "__lines__"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def _flatten(tree: dict, path: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{'train': {'lr': 1}} -> {'train.lr': (1, 'file:3')}; free-form dicts stay whole."""
    out: dict[str, tuple[Any, str]] = {}
    lines = tree.get("__lines__", {})
    for key, value in tree.items():
        if key == "__lines__":
            continue
        dotted = f"{prefix}{key}"
        origin = f"{path}:{lines.get(key, '?')}"
        if isinstance(value, dict) and _is_section(dotted):
            out.update(_flatten(value, path, dotted + "."))
        else:
            out[dotted] = (_strip_lines(value), origin)
    return out


def _section_types(cls=Config, prefix="") -> dict[str, type]:
    """Every settable dotted key -> its annotated type; sections are recursed into."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ("origins", "notices"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_section_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


_KEYS = _section_types()
_SECTIONS = {k.rsplit(".", 1)[0] for k in _KEYS if "." in k} | {
    ".".join(k.split(".")[:i]) for k in _KEYS for i in range(1, k.count(".") + 1)
}


def _is_section(dotted: str) -> bool:
    return dotted in _SECTIONS


def _check_type(key: str, value: Any, tp, where: str) -> Any:
    """Validate `value` against annotation `tp`; return it (ints widened to float where needed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {key} has an invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-07-26 as a date
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}={value!r} must be a string")
        return value
    if tp is list or origin is list:
        if isinstance(value, (str, dict)):
            return [value]  # a single source is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}={value!r} must be a list")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping")
        return value
    return value


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_KEYS) + sorted(_SECTIONS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see README.md for the list of keys"
    return ConfigError(f"{where}: unknown key {key}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003): the value is parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string (no dot): accept scientific notation for numbers
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(recipe: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a recipe YAML and apply `key=value` overrides; validate everything."""
    flat: dict[str, tuple[Any, str]] = {}
    if recipe is not None:
        if not os.path.isfile(recipe):
            raise ConfigError(f"recipe {recipe} not found; pass --recipe with a YAML file (see recipes/)")
        try:
            with open(recipe) as f:
                tree = yaml.load(f, Loader=_LineLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{recipe}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{recipe}: a recipe must be a YAML mapping of sections")
        flat.update(_flatten(tree, recipe))
    for text in overrides:
        key, value = parse_override(text)
        if isinstance(value, dict) and _is_section(key):
            flat.update(_flatten(value, "override", key + "."))
        else:
            flat[key] = (value, f"override {key}")
    return build_config(flat)


def build_config(flat: dict[str, tuple[Any, str]]) -> Config:
    cfg = Config()
    for key, (value, where) in flat.items():
        if key not in _KEYS:
            raise _unknown_key(key, where)
        value = _check_type(key, value, _KEYS[key], where)
        section = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            section = getattr(section, p)
        setattr(section, leaf, value)
        cfg.origins[key] = where
    validate(cfg)
    return cfg


def _require(cond: bool, cfg: Config, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{cfg.where(key)}: {key}={_get(cfg, key)!r} {message}")


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Value checks that a type alone cannot express."""
    t, d = cfg.train, cfg.data
    _require(t.max_steps >= 1, cfg, "train.max_steps", "must be >= 1")
    _require(t.micro_batch_size >= 1, cfg, "train.micro_batch_size", "must be >= 1")
    _require(t.grad_accum >= 1, cfg, "train.grad_accum", "must be >= 1")
    _require(t.lr > 0, cfg, "train.lr", "must be > 0")
    _require(0 <= t.min_lr_ratio <= 1, cfg, "train.min_lr_ratio", "must be in [0, 1]")
    _require(t.warmup_steps >= 0, cfg, "train.warmup_steps", "must be >= 0")
    if t.warmup_steps > t.max_steps:
        # a quick `train.max_steps=4` smoke run of a recipe with a longer warmup should just work
        cfg.notices.append(f"notice: train.warmup_steps={t.warmup_steps} exceeds train.max_steps={t.max_steps}; "
                           f"warmup clamped to {t.max_steps} steps")
        t.warmup_steps = t.max_steps
    _require(t.max_grad_norm >= 0, cfg, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    _require(t.save_every >= 0, cfg, "train.save_every", "must be >= 0 (0 = only at the end)")
    _require(t.eval_every >= 0, cfg, "train.eval_every", "must be >= 0 (0 = never)")
    _require(t.keep_last >= 1, cfg, "train.keep_last", "must be >= 1")
    _require(t.log_every >= 1, cfg, "train.log_every", "must be >= 1")
    _require(t.loss_chunk_tokens >= 0, cfg, "train.loss_chunk_tokens", "must be >= 0 (0 = unchunked)")
    _require(d.max_seq_len >= 2, cfg, "data.max_seq_len", "must be >= 2")
    _require(0 <= d.max_bad_fraction <= 1, cfg, "data.max_bad_fraction", "must be in [0, 1]")
    _require(0 <= d.eval_fraction < 1, cfg, "data.eval_fraction", "must be in [0, 1)")
    _require(bool(d.train), cfg, "data.train", "is empty; list at least one training file or dataset")
    _require(_is_iso_date(d.template_date), cfg, "data.template_date", "must be a date as YYYY-MM-DD")
    _require(cfg.dist.timeout_minutes > 0, cfg, "dist.timeout_minutes", "must be > 0")
    _require(cfg.dist.wait_minutes > 0, cfg, "dist.wait_minutes", "must be > 0")
    _require(d.prepare_workers >= 0, cfg, "data.prepare_workers", "must be >= 0 (0 = automatic)")
    _require(d.prepare_chunk_rows >= 1, cfg, "data.prepare_chunk_rows", "must be >= 1")
    _require(d.prepare_timeout_minutes > 0, cfg, "data.prepare_timeout_minutes", "must be > 0")
    _require(cfg.dpo.beta > 0, cfg, "dpo.beta", "must be > 0")
    _require(0 <= cfg.dpo.label_smoothing < 0.5, cfg, "dpo.label_smoothing", "must be in [0, 0.5)")
    _require(cfg.dpo.nll_weight >= 0, cfg, "dpo.nll_weight", "must be >= 0")
    _validate_lora(cfg)
    m = cfg.model
    if (m.name_or_path is None) == (m.config is None):
        raise ConfigError(
            f"{cfg.where('model.name_or_path')}: set exactly one of model.name_or_path (hub id or "
            "local directory) and model.config (architecture to build from scratch)"
        )
    if m.config is not None and "model_type" not in m.config:
        raise ConfigError(f"{cfg.where('model.config')}: model.config needs model_type (e.g. llama, qwen2, mistral, gpt2)")
    if m.config is not None and m.tokenizer is None:
        raise ConfigError(f"{cfg.where('model.config')}: a model built from model.config needs model.tokenizer (a tokenizer directory)")
    if ".." in os.path.normpath(cfg.output_dir).split(os.sep):
        raise ConfigError(f"{cfg.where('output_dir')}: output_dir={cfg.output_dir!r} must not climb out with '..'")


def _is_iso_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
        return True
    except ValueError:
        return False


def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    if not lo.enabled:
        if lo.qlora or lo.merge:
            key = "lora.qlora" if lo.qlora else "lora.merge"
            raise ConfigError(f"{cfg.where(key)}: {key}=true needs lora.enabled=true")
        return
    _require(lo.r >= 1, cfg, "lora.r", "must be >= 1 (the adapter rank)")
    _require(lo.alpha > 0, cfg, "lora.alpha", "must be > 0")
    _require(0 <= lo.dropout < 1, cfg, "lora.dropout", "must be in [0, 1)")
    tm = lo.target_modules
    ok = tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) and x for x in tm))
    _require(ok, cfg, "lora.target_modules", 'must be "all-linear" or a non-empty list of module names (e.g. [q_proj, v_proj])')
    _require(all(isinstance(x, str) and x for x in lo.modules_to_save), cfg, "lora.modules_to_save",
             "must be a list of module names (e.g. [embed_tokens, lm_head])")
    if cfg.model.name_or_path is None:
        raise ConfigError(f"{cfg.where('lora.enabled')}: lora.enabled=true needs a pretrained base in model.name_or_path "
                          "(a model built from model.config has random weights that final/ would not hold)")


def sources(cfg: Config, key: str) -> list[SourceConfig]:
    """data.train / data.eval entries -> SourceConfig, with clear errors for bad entries."""
    out = []
    for i, entry in enumerate(_get(cfg, key)):
        where = cfg.where(key)
        if isinstance(entry, str):
            out.append(SourceConfig(path=entry))
        elif isinstance(entry, dict):
            unknown = set(entry) - {f.name for f in dataclasses.fields(SourceConfig)}
            if unknown:
                raise ConfigError(f"{where}: {key}[{i}] has unknown field(s) {sorted(unknown)}; allowed: "
                                  f"{', '.join(f.name for f in dataclasses.fields(SourceConfig))}")
            if "path" not in entry:
                raise ConfigError(f"{where}: {key}[{i}] needs a path")
            src = SourceConfig(**entry)
            if not (isinstance(src.weight, (int, float)) and src.weight > 0):
                raise ConfigError(f"{where}: {key}[{i}].weight={src.weight!r} must be a number > 0")
            _check_source(src, f"{where}: {key}[{i}]")
            out.append(src)
        else:
            raise ConfigError(f"{where}: {key}[{i}]={entry!r} must be a path or a mapping with path/format/weight")
    return out


# what a source's `columns` may map to: the fields the row readers understand
SOURCE_FIELDS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "chosen",
                 "rejected", "text")


def _check_source(src: SourceConfig, where: str) -> None:
    for name in ("name", "split", "revision"):
        value = getattr(src, name)
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{where}.{name}={value!r} must be a non-empty string")
    if not isinstance(src.streaming, bool):
        raise ConfigError(f"{where}.streaming={src.streaming!r} must be true or false")
    if src.columns is None:
        return
    if not isinstance(src.columns, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                    for k, v in src.columns.items()):
        raise ConfigError(f"{where}.columns must map our field names to dataset column names, "
                          f"e.g. {{messages: conversation}}")
    unknown = sorted(set(src.columns) - set(SOURCE_FIELDS))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], SOURCE_FIELDS, n=1)
        raise ConfigError(f"{where}.columns has key(s) {unknown}: keys are our field names ({', '.join(SOURCE_FIELDS)}) "
                          f"and values the dataset's columns, e.g. {{messages: {unknown[0]}}}"
                          + (f"; did you mean {hint[0]}?" if hint else ""))


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("origins", None)
    d.pop("notices", None)
    return d


_SECRET_SUFFIXES = ("_token", "_key", "_secret", "password")


def redact(obj: Any) -> Any:
    """Replace values of secret-looking keys (api keys, tokens) before anything is written."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if isinstance(k, str) and k.lower().endswith(_SECRET_SUFFIXES) and v else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def save_resolved(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(redact(to_dict(cfg)), f, sort_keys=False)
    os.replace(tmp, path)
