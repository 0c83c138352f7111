"""Memory planner: per-GPU memory of a recipe under ZeRO 0/1/2/3, with and without CPU offload,
and a recommendation (stage, offload, micro-batch, gradient checkpointing) that fits.

Model states (mixed precision + AdamW; Rajbhandari et al. 2020, "ZeRO"), bytes per parameter P:
  2 (bf16 params) + 2 (bf16 grads) + 12 (fp32 master copy, Adam m, Adam v) = 16
  ZeRO-0   16 P                      every rank holds everything (DDP)
  ZeRO-1    4 P + 12 P / N           optimizer states partitioned over N ranks
  ZeRO-2    2 P + 14 P / N           + gradients partitioned
  ZeRO-3   16 P / N                  + parameters partitioned
  offload_optimizer: the 12 P (/ N) go to CPU RAM; offload_param (ZeRO-3): the 2 + 2 too.
DeepSpeed's own estimators (deepspeed.runtime.zero.stage_1_and_2 / stage3
`estimate_zero*_model_states_mem_needs`) add working buffers on top: ZeRO-2 also counts a 4 P / N
fp32 gradient partition; ZeRO-3 counts 18 P / N and a 4-byte copy of the largest layer
(tests/unit/test_plan.py pins the exact relation).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", eq. 2, 16-bit activations), per layer, s = tokens per row, b = micro-batch, h = hidden,
a = attention heads:
  no recompute                 s*b*h*(34 + 5*a*s/h) bytes   (5*a*s/h: the s x s attention scores;
                               flash attention / fused sdpa never stores them -> s*b*h*34)
  full checkpointing           2*s*b*h bytes per layer (the layer input) + one layer recomputed
                               at a time (s*b*h*34 [+ 5*a*s^2*b]) during backward
  logits                       b*s*V*4*2 bytes: fp32 logits and their gradient; with
                               train.loss_chunk_tokens = c: c*V*4*2 (the chunked head)
Sequence parallelism (Ulysses, SP ranks): every rank holds s/SP tokens of each row, so s -> s/SP
above (the all-to-all hands attention the whole row with a/SP heads: the same bytes). ZeRO then
partitions over all N ranks (DeepSpeed's sequence-data-parallel group is the whole world).
Tensor parallelism (AutoTP, TP ranks; Korthikanti eq. 3 without their sequence parallelism):
s*b*h*(10 + 24/TP + 5*a*s/(h*TP)) per layer (the residual stream stays replicated); the linear
layers' weights, gradients and optimizer states are split TP ways (embeddings and norms are not),
ZeRO partitions over the N/TP data-parallel ranks, and the logits are whole on every TP rank.
The 34 assumes a 4h MLP; SwiGLU models (Llama, Qwen: ~3.5h of 3 matrices) are close to it. A fixed
`overhead_gib` (CUDA context, NCCL buffers, allocator fragmentation; default 2 GiB) is added.
These are estimates: measure with a short run before committing a cluster allocation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ..config import Config
from ..distributed.mesh import build_mesh, check_model, check_zero_stage
from ..errors import ConfigError

GIB = 1024**3
BYTES_PARAM16, BYTES_GRAD16, BYTES_OPTIM32 = 2, 2, 12  # per parameter: bf16 weight, bf16 grad, fp32 master + m + v


@dataclass
class ModelShape:
    params: int  # total parameters, tied weights counted once
    largest_layer_params: int  # parameters of the largest single module (ZeRO-3 gathers one at a time)
    hidden: int
    layers: int
    heads: int
    vocab: int
    linear_params: int = 0  # nn.Linear weights and biases (what AutoTP shards; the LM head included)


@dataclass
class Option:
    stage: int  # ZeRO stage 0-3
    offload: str  # "none" | "optimizer" | "optimizer+param"
    micro_batch_size: int
    gradient_checkpointing: bool
    model_states_gib: float  # per GPU
    activations_gib: float  # per GPU (incl. logits)
    total_gib: float  # + overhead (+ ZeRO-3 gather buffer)
    cpu_gib: float  # offloaded states per rank, in CPU RAM

    def label(self) -> str:
        return f"ZeRO-{self.stage}" + ("" if self.offload == "none" else f" + offload {self.offload}")


# --------------------------------------------------------------------------- model shape


def hf_config_for(cfg: Config, model_config_path: Optional[str] = None):
    """The recipe's Hugging Face config without any weights: model.config, a config.json, or the hub."""
    from transformers import AutoConfig

    m = cfg.model
    if model_config_path:
        return AutoConfig.from_pretrained(model_config_path)
    if m.config is not None:
        spec = dict(m.config)
        if "vocab_size" not in spec and m.tokenizer:
            from transformers import AutoTokenizer

            spec["vocab_size"] = len(AutoTokenizer.from_pretrained(m.tokenizer))
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    try:
        return AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # offline, gated, or a run directory that does not exist yet
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.name_or_path: cannot read the config of {m.name_or_path!r} ({first}); "
                          "pass --model-config with a config.json (file or directory)") from None


def model_shape(hf_config) -> ModelShape:
    """Parameters counted on a meta-device model: exact for any architecture, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    unique = {id(p): p.numel() for p in model.parameters()}  # tied embeddings once
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    linear = sum(p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear) for p in mod.parameters())
    return ModelShape(params=sum(unique.values()), largest_layer_params=largest, hidden=text.hidden_size,
                      layers=text.num_hidden_layers, heads=text.num_attention_heads, vocab=text.vocab_size,
                      linear_params=linear)


def params_per_rank(shape: ModelShape, tp: int) -> int:
    """Parameters one TP rank holds: the linear layers split TP ways, the rest replicated."""
    if tp == 1:
        return shape.params
    return shape.params - shape.linear_params + -(-shape.linear_params // tp)


# --------------------------------------------------------------------------- formulas


def model_state_bytes(params: int, stage: int, gpus: int, offload: str = "none") -> tuple[float, float]:
    """(GPU bytes, CPU bytes) per rank for params/grads/optimizer states (module docstring)."""
    p16, g16, opt = BYTES_PARAM16 * params, BYTES_GRAD16 * params, BYTES_OPTIM32 * params
    if stage >= 1:
        opt /= gpus
    if stage >= 2:
        g16 /= gpus
    if stage >= 3:
        p16 /= gpus
    cpu = 0.0
    if offload in ("optimizer", "optimizer+param"):
        if stage == 0:
            raise ValueError("offload needs ZeRO stage >= 1")
        cpu, opt = opt, 0.0
    if offload == "optimizer+param":
        if stage != 3:
            raise ValueError("parameter offload needs ZeRO-3")
        cpu, p16, g16 = cpu + p16 + g16, 0.0, 0.0
    return p16 + g16 + opt, cpu


def activation_bytes(shape: ModelShape, micro_batch_size: int, seq_len: int, checkpointing: bool,
                     flash: bool = True, loss_chunk_tokens: int = 0, sp: int = 1, tp: int = 1) -> float:
    """Korthikanti et al. 2022 per-layer estimate + logits (module docstring), per rank of an SP/TP group."""
    s, b, h, a = -(-seq_len // sp), micro_batch_size, shape.hidden, shape.heads  # s: this rank's tokens of a row
    scores = 0 if flash else 5 * a * seq_len / (h * tp)  # stored attention scores (eager attention only)
    full_layer = s * b * h * (10 + 24 / tp + scores)
    if checkpointing:
        layers = shape.layers * 2 * s * b * h + full_layer  # saved inputs + one layer recomputed
    else:
        layers = shape.layers * full_layer
    logit_tokens = min(loss_chunk_tokens, b * s) if loss_chunk_tokens > 0 else b * s
    return layers + logit_tokens * shape.vocab * 4 * 2


def options(shape: ModelShape, gpus: int, seq_len: int, micro_batch_size: int, checkpointing: bool,
            loss_chunk_tokens: int = 0, flash: bool = True, overhead_gib: float = 2.0, sp: int = 1,
            tp: int = 1) -> list[Option]:
    """Every (stage, offload) for the given micro-batch and checkpointing setting (ZeRO-3 not under TP)."""
    out = []
    combos = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (1, "optimizer"), (2, "optimizer"),
              (3, "optimizer"), (3, "optimizer+param")]
    for stage, offload in combos:
        if tp > 1 and stage == 3:
            continue  # distributed/mesh.check_zero_stage
        # ZeRO partitions over the data-parallel group: all ranks under SP, world / TP under TP
        gpu, cpu = model_state_bytes(params_per_rank(shape, tp), stage, gpus // tp, offload)
        act = activation_bytes(shape, micro_batch_size, seq_len, checkpointing, flash, loss_chunk_tokens, sp, tp)
        gather = 2 * 2 * shape.largest_layer_params if stage == 3 else 0  # current + prefetched layer, bf16
        total = gpu + act + gather + overhead_gib * GIB
        out.append(Option(stage, offload, micro_batch_size, checkpointing, gpu / GIB, act / GIB, total / GIB, cpu / GIB))
    return out


def recommend(shape: ModelShape, gpus: int, gpu_mem_gib: float, seq_len: int, micro_batch_size: int,
              checkpointing: bool, loss_chunk_tokens: int = 0, flash: bool = True,
              overhead_gib: float = 2.0, sp: int = 1, tp: int = 1) -> Optional[Option]:
    """The first option that fits, in this order of preference (fastest first): no offload before
    optimizer offload before parameter offload; lower ZeRO stage before higher (less communication);
    the recipe's checkpointing setting before turning it on; the recipe's micro-batch before halving it
    (raise train.grad_accum by the same factor to keep the global batch)."""
    micro_batches = [micro_batch_size]
    while micro_batches[-1] > 1:
        micro_batches.append(max(1, micro_batches[-1] // 2))
    checkpoint_settings = [checkpointing] if checkpointing else [False, True]
    for offload in ("none", "optimizer", "optimizer+param"):
        for stage in (0, 1, 2, 3):
            if (offload != "none" and stage == 0) or (offload == "optimizer+param" and stage != 3):
                continue
            for ckpt in checkpoint_settings:
                for mbs in micro_batches:
                    for o in options(shape, gpus, seq_len, mbs, ckpt, loss_chunk_tokens, flash, overhead_gib, sp, tp):
                        if o.stage == stage and o.offload == offload and o.total_gib <= gpu_mem_gib:
                            return o
    return None


# --------------------------------------------------------------------------- report


def _ds_stage(path: str) -> tuple[int, str]:
    try:
        with open(path) as f:
            zero = json.load(f).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError):
        return -1, "none"
    stage = int(zero.get("stage", 0))
    opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    return stage, "optimizer+param" if par else "optimizer" if opt else "none"


def _gib(x: float) -> str:
    return f"{x:.1f}" if x >= 1 or x == 0 else f"{x:.3f}"  # small (debug) models stay readable


def report(cfg: Config, gpus: int, gpu_mem_gib: float, model_config_path: Optional[str] = None,
           overhead_gib: float = 2.0, flash: bool = True) -> str:
    hf_config = hf_config_for(cfg, model_config_path)
    shape = model_shape(hf_config)
    t, d, m = cfg.train, cfg.data, cfg.model
    seq = d.max_seq_len
    # the checks the run does at start-up, with --gpus as the world size: one line naming the keys
    mesh = build_mesh(cfg.parallel, gpus, 0)
    check_model(cfg.parallel, hf_config)
    sp, tp = mesh.sp, mesh.tp
    stage, offload = _ds_stage(cfg.deepspeed.config)
    if stage >= 0:
        check_zero_stage(cfg.parallel, stage, cfg.deepspeed.config)
    lines = [
        f"model: {shape.params / 1e9:.3f}B params ({shape.params:,}; largest layer {shape.largest_layer_params:,}), "
        f"hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, vocab {shape.vocab:,}",
        f"recipe: micro_batch_size {t.micro_batch_size} x {seq} tokens, gradient_checkpointing "
        f"{m.gradient_checkpointing}, loss_chunk_tokens {t.loss_chunk_tokens}, {gpus} GPU(s) of {gpu_mem_gib:g} GiB, "
        f"attention {'flash/sdpa (no stored scores)' if flash else 'eager (stores s x s scores)'}, "
        f"overhead {overhead_gib:g} GiB",
        f"{mesh.describe()} over {gpus} GPU(s): each row split over {sp} rank(s), weights over {tp}; "
        f"ZeRO partitions over {gpus // tp} rank(s)",
        "",
        "| ZeRO | offload | model states GiB/GPU | activations GiB/GPU | total GiB/GPU | CPU GiB/rank | fits |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in options(shape, gpus, seq, t.micro_batch_size, m.gradient_checkpointing, t.loss_chunk_tokens, flash,
                     overhead_gib, sp, tp):
        lines.append(f"| {o.stage} | {o.offload} | {_gib(o.model_states_gib)} | {_gib(o.activations_gib)} | "
                     f"{_gib(o.total_gib)} | {_gib(o.cpu_gib)} | {'yes' if o.total_gib <= gpu_mem_gib else 'no'} |")
    act_other = activation_bytes(shape, t.micro_batch_size, seq, not m.gradient_checkpointing, flash,
                                 t.loss_chunk_tokens, sp, tp) / GIB
    lines.append(f"(activations with gradient_checkpointing={not m.gradient_checkpointing}: {_gib(act_other)} GiB/GPU)")
    if stage >= 0:
        lines.append(f"recipe's {cfg.deepspeed.config}: ZeRO-{stage}, offload {offload}")
    best = recommend(shape, gpus, gpu_mem_gib, seq, t.micro_batch_size, m.gradient_checkpointing,
                     t.loss_chunk_tokens, flash, overhead_gib, sp, tp)
    if best is None:
        lines.append(f"recommendation: nothing fits in {gpu_mem_gib:g} GiB per GPU even with ZeRO-3, parameter "
                     "offload, checkpointing and micro_batch_size 1: add GPUs, shorten data.max_seq_len, or use LoRA")
    else:
        accum = t.grad_accum * t.micro_batch_size // best.micro_batch_size
        cfgs = {(2, "none"): "ds_configs/zero2.json", (3, "none"): "ds_configs/zero3.json",
                (2, "optimizer"): "ds_configs/zero2_offload.json", (3, "optimizer+param"): "ds_configs/zero3_offload.json",
                (0, "none"): "ds_configs/zero0.json", (1, "none"): "ds_configs/zero1.json"}
        ds = cfgs.get((best.stage, best.offload), f"a ZeRO-{best.stage} JSON with offload {best.offload}")
        lines.append(f"recommendation: {best.label()}, micro_batch_size {best.micro_batch_size} (grad_accum {accum}: "
                     f"same global batch), gradient_checkpointing {best.gradient_checkpointing} -> "
                     f"~{best.total_gib:.1f} of {gpu_mem_gib:g} GiB per GPU")
        lines.append(f"  overrides: deepspeed.config={ds} train.micro_batch_size={best.micro_batch_size} "
                     f"train.grad_accum={accum} model.gradient_checkpointing={str(best.gradient_checkpointing).lower()}")
    if not t.loss_chunk_tokens and shape.vocab >= 64000 and tp == 1:  # TP shards the head: no chunking
        chunked = activation_bytes(shape, t.micro_batch_size, seq, m.gradient_checkpointing, flash, 1024, sp, tp) / GIB
        lines.append(f"hint: train.loss_chunk_tokens=1024 would cut activations to ~{chunked:.1f} GiB "
                     f"(the {shape.vocab:,}-token logits are never materialised)")
    return "\n".join(lines)
