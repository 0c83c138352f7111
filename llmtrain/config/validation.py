"""Value checks that a type alone cannot express; each failure names the key, its file:line and the fix."""
from __future__ import annotations

import datetime
import os
from typing import Any

from ..errors import ConfigError
from .schema import Config


def _require(cond: bool, cfg: Config, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{cfg.where(key)}: {key}={get_key(cfg, key)!r} {message}")


def get_key(cfg: Config, key: str) -> Any:
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
    _require(cfg.dist.wait_minutes >= 0, cfg, "dist.wait_minutes", "must be >= 0 (0 = no cap)")
    _require(cfg.dist.stale_minutes > 0, cfg, "dist.stale_minutes", "must be > 0")
    _require(d.prepare_workers >= 0, cfg, "data.prepare_workers", "must be >= 0 (0 = automatic)")
    _require(d.prepare_chunk_rows >= 1, cfg, "data.prepare_chunk_rows", "must be >= 1")
    _require(d.prepare_timeout_minutes >= 0, cfg, "data.prepare_timeout_minutes", "must be >= 0 (0 = no cap)")
    _require(cfg.dpo.beta > 0, cfg, "dpo.beta", "must be > 0")
    _require(0 <= cfg.dpo.label_smoothing < 0.5, cfg, "dpo.label_smoothing", "must be in [0, 0.5)")
    _require(cfg.dpo.nll_weight >= 0, cfg, "dpo.nll_weight", "must be >= 0")
    _require(cfg.reward.center_coef >= 0, cfg, "reward.center_coef", "must be >= 0 (0 = no centering)")
    _validate_lora(cfg)
    _validate_rl(cfg)
    _validate_parallel(cfg)
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


def check_produced_inputs(cfg: Config) -> None:
    """A produced_by input the recipe still uses and that is missing: one line naming the command that
    makes it. Called by the commands that read the inputs (training, prepare, inspect, plan) before
    any model, tokenizer or data loading would say only "not found"; not at load time, so that a
    recipe can be loaded and checked before its inputs exist."""
    d = cfg.data
    used = [cfg.model.name_or_path, cfg.model.tokenizer]
    used += [e if isinstance(e, str) else e.get("path") for e in [*d.train, *d.eval] if isinstance(e, (str, dict))]
    used_paths = {os.path.normpath(p) for p in used if isinstance(p, str)}
    for path, command in cfg.produced_by.items():
        if os.path.normpath(str(path)) in used_paths and not os.path.exists(os.path.expanduser(str(path))):
            raise ConfigError(f"{cfg.where('produced_by')}: {path} does not exist yet; it is made by `{command}`: "
                              "run that first")


def _is_iso_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
        return True
    except ValueError:
        return False


def _validate_parallel(cfg: Config) -> None:
    """The mesh checks that need no world size or model (distributed/mesh.py does the rest at start-up)."""
    p = cfg.parallel
    sp, tp = p.sequence_parallel_size, p.tensor_parallel_size
    _require(sp >= 1, cfg, "parallel.sequence_parallel_size", "must be >= 1 (1 = off)")
    _require(tp >= 1, cfg, "parallel.tensor_parallel_size", "must be >= 1 (1 = off)")
    _require(p.tiled_mlp_shards >= 0, cfg, "parallel.tiled_mlp_shards", "must be >= 0 (0 = off)")
    # AutoTP replaces gate/up/down inside deepspeed.initialize, after the tiles captured their weights
    _require(p.tiled_mlp_shards == 0 or tp == 1, cfg, "parallel.tiled_mlp_shards",
             "must be 0 with parallel.tensor_parallel_size>1 (AutoTP replaces the MLP's layers; untested)")
    if sp > 1 and tp > 1:
        # DeepSpeed 0.19.8 puts both groups on the innermost consecutive ranks and AutoTP replaces the
        # engine's mpu with one that has no SP getters, so ZeRO would reduce as if SP were 1
        raise ConfigError(f"{cfg.where('parallel.sequence_parallel_size')}: parallel.sequence_parallel_size={sp} with "
                          f"parallel.tensor_parallel_size={tp}: DeepSpeed {_ds_version()} cannot combine Ulysses SP "
                          "and AutoTP in one run; use one of them")
    if sp > 1:
        attn = cfg.model.attn_implementation
        _require(attn not in ("eager", "flex_attention"), cfg, "model.attn_implementation",
                 "is not supported with parallel.sequence_parallel_size>1 (DeepSpeed's Ulysses rejects eager "
                 "and rebuilds a plain causal mask for flex, losing packing); use auto, sdpa or flash_attention_2")
        _require(cfg.data.max_seq_len >= sp, cfg, "data.max_seq_len",
                 f"is below parallel.sequence_parallel_size={sp}: every rank needs at least "
                 "one token of each row")
    if tp > 1:
        _require(cfg.train.loss_chunk_tokens == 0, cfg, "train.loss_chunk_tokens",
                 "must be 0 with parallel.tensor_parallel_size>1 (AutoTP shards the LM head over the vocabulary; "
                 "the chunked head needs the whole weight)")
        _require(not cfg.lora.enabled, cfg, "lora.enabled",
                 "is not supported with parallel.tensor_parallel_size>1 (AutoTP of PEFT-wrapped layers is untested)")


def _ds_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return "(not installed)"


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


def _validate_rl(cfg: Config) -> None:
    """rl.* values; the batch-shape rule that needs the world size is checked by objectives/rl when the run starts."""
    r = cfg.rl
    _require(r.num_generations >= 1, cfg, "rl.num_generations", "must be >= 1")
    if r.advantage in ("grpo", "rloo"):
        _require(r.num_generations >= 2, cfg, "rl.num_generations", f"must be >= 2 for rl.advantage={r.advantage} "
                 "(group baselines compare samples of one prompt)")
    _require(r.prompts_per_step >= 1, cfg, "rl.prompts_per_step", "must be >= 1")
    _require(r.oversample >= 1, cfg, "rl.oversample", "must be >= 1 (1 = no dynamic sampling)")
    _require(r.temperature > 0, cfg, "rl.temperature", "must be > 0")
    _require(0 < r.top_p <= 1, cfg, "rl.top_p", "must be in (0, 1]")
    _require(r.max_new_tokens >= 1, cfg, "rl.max_new_tokens", "must be >= 1")
    _require(r.ppo_epochs >= 1, cfg, "rl.ppo_epochs", "must be >= 1")
    _require(r.mini_batches >= 1, cfg, "rl.mini_batches", "must be >= 1")
    _require(0 <= r.clip_low < 1, cfg, "rl.clip_low", "must be in [0, 1)")
    _require(r.clip_high >= 0, cfg, "rl.clip_high", "must be >= 0")
    _require(r.kl_coef >= 0, cfg, "rl.kl_coef", "must be >= 0 (0 = no reference model)")
    _require(r.std_eps >= 0, cfg, "rl.std_eps", "must be >= 0")
    _require(r.generation_batch_size >= 1, cfg, "rl.generation_batch_size", "must be >= 1")
    _require(0 < r.vllm_gpu_memory_utilization <= 1, cfg, "rl.vllm_gpu_memory_utilization", "must be in (0, 1]")
    _require(r.vllm_max_model_len >= 0, cfg, "rl.vllm_max_model_len", "must be >= 0 (0 = from the prompts)")
    ok = all(isinstance(f, str) and f.count(":") == 1 and all(f.split(":")) for f in r.reward_fns)
    _require(ok, cfg, "rl.reward_fns", "must be a list of `module:function` names")
    if r.reward_weights:
        _require(len(r.reward_weights) == len(r.reward_fns), cfg, "rl.reward_weights",
                 f"must have one weight per rl.reward_fns entry ({len(r.reward_fns)})")
    if r.advantage == "gae":
        _validate_ppo(cfg)


def _validate_ppo(cfg: Config) -> None:
    r = cfg.rl
    if r.critic is None and r.reward_model is None:
        raise ConfigError(f"{cfg.where('rl.critic')}: rl.advantage=gae (PPO) needs a critic: set rl.critic to a "
                          "sequence-classification directory (e.g. launch/reward.py final/), or rl.reward_model")
    _require(0 <= r.gamma <= 1, cfg, "rl.gamma", "must be in [0, 1]")
    _require(0 <= r.lam <= 1, cfg, "rl.lam", "must be in [0, 1]")
    _require(r.value_clip > 0, cfg, "rl.value_clip", "must be > 0")
    _require(r.vf_coef > 0, cfg, "rl.vf_coef", "must be > 0")
    _require(r.critic_lr is None or r.critic_lr > 0, cfg, "rl.critic_lr", "must be > 0 (absent: train.lr)")
