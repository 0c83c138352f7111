"""Rollouts from a colocated vLLM engine (rl.generation_backend=vllm, GPU only).

One vLLM engine per rank, in the training process, on the rank's GPU (TRL's "colocate" mode), built
from the policy's starting weights (model.name_or_path) in the run's precision, tensor parallel 1.
Targets the vLLM API that trl 1.16 targets (vLLM 0.22-0.31, trl/generation/vllm_generation.py):
`LLM(..., distributed_executor_backend="external_launcher", enable_sleep_mode=...)`,
`LLM.generate([{"prompt_token_ids": ...}], [SamplingParams])`, `sleep(level=2)` / `wake_up(tags)`,
`reset_prefix_cache()`, and weights pushed through the in-process model's `load_weights` (the one
entry point: `_vllm_model`).

Weight sync: before a generate (rollout or eval) whose weights are stale, i.e. once after each run
of optimizer updates, never per step: a rollout that lasts ppo_epochs x mini_batches steps syncs
once. The first generate of a run always syncs (a resumed run's engine holds the checkpoint, vLLM
the starting weights; with sleep mode the weights are discarded after every generate anyway).
Under ZeRO-3 the parameters are gathered one module at a time (its own parameters, or a LoRA layer
with its adapters), so the peak extra memory is one layer, not a replica; every rank walks the
modules in the same order (the gathers are collectives). LoRA: each adapted layer's merged weight
W + scaling x B @ A is computed as a new tensor (peft's get_delta_weight) and pushed under the base
name; the training weights are never merged in place (an in-place merge/unmerge under ZeRO 0-2
would leave W + d - d != W in the trained weights).

What vLLM does not replace: the log-probs of the loss (old, reference and new) are always
recomputed by the training engine on the sampled tokens; vLLM's own log-probs are not requested.
What is not exact: vLLM samples with its own RNG and kernels. Each prompt's request carries a seed
derived from (train.seed, rollout, prompt stream position), but the keyed sampler's guarantees
(the same samples on 1 or N ranks, in any batch, after a resume, == the hf backend) do not hold.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import torch

from ... import distributed as dist
from ...config import LoraConfig, ModelConfig, RLConfig
from ...errors import ConfigError
from .generation import cut_at_stop
from .sampling import row_seed

NOT_EXACT = ("rl: generation_backend=vllm: samples come from vLLM's own RNG and kernels: the keyed sampler's "
             "rank/batch invariance and exact resume do not hold on this backend (log-probs for the loss are "
             "recomputed by the training engine)")


def import_vllm(where: str):
    """The vllm module, or one error line naming the install."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"{where}: rl.generation_backend=vllm needs the vllm package (CUDA GPUs): "
                          f"pip install vllm ({e}); or set rl.generation_backend=hf") from None
    return vllm


def check_config(r: RLConfig, m: ModelConfig, lo: LoraConfig) -> None:
    """At load time, on every rank: vllm importable, a model vLLM can load, an adapter we can merge."""
    where = r.where("rl.generation_backend")
    import_vllm(where)
    if m.name_or_path is None:
        raise ConfigError(f"{where}: rl.generation_backend=vllm builds its engine from model.name_or_path (a model "
                          "directory or hub id); a model built from model.config has none: save it first, or use hf")
    if lo.enabled and (lo.qlora or lo.use_dora):
        raise ConfigError(f"{where}: rl.generation_backend=vllm merges plain LoRA adapters into the weights it pushes; "
                          f"lora.{'qlora' if lo.qlora else 'use_dora'}=true is not supported there: use hf")


def max_model_len(r: RLConfig, data) -> int:
    """rl.vllm_max_model_len, or the longest train/eval prompt + rl.max_new_tokens (a smaller KV reservation
    than the model's full context)."""
    if r.vllm_max_model_len > 0:
        return r.vllm_max_model_len
    sets = [data.prompts] + ([data.eval_prompts] if data.eval_prompts is not None else [])
    return max(s.max_len() for s in sets) + r.max_new_tokens


def vllm_dtype(ds_config: dict) -> str:
    """The training precision as vLLM's dtype (bf16/fp16 blocks of the DeepSpeed config, else fp32)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bfloat16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "float16"
    return "float32"


# --- the policy's weights under vLLM's names ---
def _lora_layer_types():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return (), ()
    return (LoraLayer,), (ModulesToSaveWrapper,)


@contextlib.contextmanager
def _gathered(params: list, stage: int):
    """These parameters whole on every rank (ZeRO-3: one all-gather; read-only, nothing written back)."""
    if stage != 3 or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _base_name(name: str) -> str:
    """Engine/peft names -> the checkpoint names vLLM's load_weights expects."""
    for prefix in ("module.", "base_model.model."):
        name = name.removeprefix(prefix)
    return name


def _merged_lora(module, prefix: str, stage: int) -> Iterator[list]:
    """A LoRA layer as its base layer with every active adapter merged in (a new tensor)."""
    base = module.get_base_layer()
    with _gathered(list(module.parameters()), stage):
        weight = base.weight.data.clone()
        if not getattr(module, "merged", False):  # merged in place already: the base weight has it
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
        chunk = [(prefix + "weight", weight)]
        if getattr(base, "bias", None) is not None:
            chunk.append((prefix + "bias", base.bias.data))
        yield chunk


def _walk(module, prefix: str, stage: int, seen: set) -> Iterator[list]:
    lora_types, wrapper_types = _lora_layer_types()
    if lora_types and isinstance(module, lora_types):
        yield from _merged_lora(module, prefix, stage)
        return
    if wrapper_types and isinstance(module, wrapper_types):  # lora.modules_to_save: the trained copy
        yield from _walk(module.modules_to_save[module.active_adapters[0]], prefix, stage, seen)
        return
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
    seen.update(id(p) for _, p in own)  # a tied weight goes once, under its first name (as HF names it)
    if own:
        with _gathered([p for _, p in own], stage):
            yield [(prefix + n, p.data) for n, p in own]
    for child_name, child in module.named_children():
        yield from _walk(child, f"{prefix}{child_name}.", stage, seen)


def _to_checkpoint_names(base_model, chunk: dict) -> dict:
    """transformers 5 may hold weights under other names/layouts than its checkpoints (e.g. fused MoE
    experts); vLLM loads checkpoint layouts, so revert as save_pretrained does (identity for dense models)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return chunk
    return revert_weight_conversion(base_model, chunk)


def policy_weights(model, stage: int) -> Iterator[list]:
    """(name, tensor) chunks, one module at a time, in vLLM's names. Under ZeRO-3 a chunk is valid only
    until the next one is requested (its gather is released): consume it at once. Collective under ZeRO-3."""
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for chunk in _walk(model, "", stage, set()):
        named = {_base_name(n): t for n, t in chunk}
        yield list(_to_checkpoint_names(base_model, named).items())


def _vllm_model(llm):
    """The in-process model whose load_weights takes (name, tensor) pairs (TRL colocate's entry point)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


class VLLMBackend:
    """A colocated vLLM engine on this rank: weight sync from the DeepSpeed engine, rollouts, greedy eval."""

    def __init__(self, r: RLConfig, m: ModelConfig, dtype: str, seed: int, info, max_model_len: int):
        vllm = import_vllm(r.where("rl.generation_backend"))
        self.vllm, self.r, self.seed = vllm, r, seed
        # external_launcher reads the torch.distributed rank/world from the environment (TRL does the same)
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        self.llm = vllm.LLM(model=m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                            dtype=dtype, tensor_parallel_size=1,
                            gpu_memory_utilization=r.vllm_gpu_memory_utilization, max_model_len=max_model_len,
                            enable_sleep_mode=r.vllm_sleep, distributed_executor_backend="external_launcher",
                            seed=seed + info.rank, skip_tokenizer_init=True)  # token ids in, token ids out
        self.sleep_mode = r.vllm_sleep
        if self.sleep_mode:
            self.llm.sleep(level=2)  # level 2 drops the weights: the first sync pushes them
        self.synced_step = None  # engine.global_steps of the weights vLLM holds; None: none valid
        self.syncs, self.last_sync_sec = 0, 0.0
        dist.print0(f"rl: vLLM {getattr(vllm, '__version__', '?')} colocated on every rank ({dtype}, "
                    f"gpu_memory_utilization {r.vllm_gpu_memory_utilization}, max_model_len {max_model_len}, "
                    f"sleep mode {'on' if self.sleep_mode else 'off'})")
        dist.print0(NOT_EXACT)

    # --- weight sync ---
    def sync(self, engine, stage: int) -> bool:
        """Push the policy's current weights if vLLM's are stale; True when it pushed. Collective under ZeRO-3
        (every rank decides alike: engine.global_steps is the same everywhere)."""
        step = engine.global_steps
        if self.synced_step == step:
            return False
        t0 = time.perf_counter()
        if self.sleep_mode:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # room for the weights vLLM maps back in (TRL: OOM otherwise)
            self.llm.wake_up(tags=["weights"])
        target = _vllm_model(self.llm)
        for chunk in policy_weights(engine.module, stage):
            target.load_weights(chunk)  # copies into vLLM's (possibly fused) tensors before the gather ends
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.synced_step = step
        self.syncs += 1
        self.last_sync_sec = time.perf_counter() - t0
        return True

    # --- generation ---
    def _generate(self, prompts: list[list[int]], params: list) -> list:
        outs = []
        if prompts:  # a rank may hold no eval prompts; it still synced (a collective) and goes back to sleep
            if self.sleep_mode:
                self.llm.wake_up(tags=["kv_cache"])
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params,
                                     use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=2)  # training gets the memory back; the weights must be pushed again
            self.synced_step = None
        return outs

    def _params(self, n: int, temperature: float, top_p: float, max_new_tokens: int, stop_ids: list[int],
                seed=None):
        return self.vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                        stop_token_ids=list(stop_ids), seed=seed, detokenize=False)

    def rollout(self, engine, stage: int, prompt_ids: list[list[int]], keys: list[tuple], stop_ids: list[int]):
        """Completions in generation.generate's form, [(token ids, truncated)], for prompt_ids as the rollout
        lays them out (each prompt num_generations times in a row, keys (rollout, stream position, sample)):
        one vLLM request per prompt with n = num_generations, seeded by (train.seed, rollout, position)."""
        r, G = self.r, self.r.num_generations
        self.sync(engine, stage)
        firsts = range(0, len(prompt_ids), G)
        params = [self._params(G, r.temperature, r.top_p, r.max_new_tokens, stop_ids,
                               seed=row_seed(self.seed, keys[i][:2], 0) % (1 << 31)) for i in firsts]
        outs = self._generate([prompt_ids[i] for i in firsts], params)
        return [c for o in outs for c in completions(o, stop_ids)]

    def greedy(self, engine, stage: int, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]):
        """Greedy completions (eval), [(token ids, truncated)]. Collective under ZeRO-3 (the sync)."""
        self.sync(engine, stage)
        params = [self._params(1, 0.0, 1.0, max_new_tokens, stop_ids) for _ in prompts]
        return [completions(o, stop_ids)[0] for o in self._generate(prompts, params)]


def completions(request_output, stop_ids: list[int]) -> list[tuple[list[int], bool]]:
    """One vLLM RequestOutput -> its samples as (token ids up to and including the first stop, truncated),
    in sample order; a stop token vLLM reports only as stop_reason is put back (the stop is trained)."""
    stops, out = set(stop_ids), []
    for c in sorted(request_output.outputs, key=lambda c: c.index):
        ids = list(c.token_ids)
        if c.finish_reason == "stop" and isinstance(c.stop_reason, int) and (not ids or ids[-1] not in stops):
            ids.append(c.stop_reason)
        out.append(cut_at_stop(ids, stops))
    return out
