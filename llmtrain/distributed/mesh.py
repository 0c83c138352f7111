"""The rank mesh DP x SP x TP (issue 16): who holds which rows, which slice of a row, which weight shard.

DeepSpeed fixes the layout: Ulysses SP groups are consecutive ranks
(deepspeed/runtime/sequence_parallel/parallel_state_sp.py:50-54, `range(i*SP, (i+1)*SP)`) and so
are AutoTP groups (deepspeed/utils/groups.py:202-237, a (dp, tp) mesh). So a rank's data-parallel
rank is rank // (SP x TP); its SP or TP peers read the same rows (the planner deals rows over DP
ranks only). SP and TP together are refused (config/validation.py), so at most one of sp/tp is > 1.

Pure: the checks here need only sizes and the model's HF config, so the planner (`llmtrain plan`)
runs them without any process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class Mesh:
    world_size: int
    rank: int
    sp: int = 1  # parallel.sequence_parallel_size
    tp: int = 1  # parallel.tensor_parallel_size

    @property
    def inner(self) -> int:
        """Ranks that share one data-parallel rank's rows (the SP or TP group size)."""
        return self.sp * self.tp

    @property
    def dp(self) -> int:
        return self.world_size // self.inner

    @property
    def dp_rank(self) -> int:
        return self.rank // self.inner

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def coordinates(self, rank: Optional[int] = None) -> dict[str, int]:
        """{'dp': .., 'sp': .., 'tp': ..} of `rank` (default: this rank), for the rank table."""
        r = self.rank if rank is None else rank
        return {"dp": r // self.inner, "sp": r % self.sp, "tp": r % self.tp}

    def describe(self) -> str:
        return f"mesh DP {self.dp} x SP {self.sp} x TP {self.tp}"


_CURRENT: Optional[Mesh] = None  # the run's mesh (set once by the runner; a plain DP mesh until then)


def set_current(mesh: Mesh) -> None:
    global _CURRENT
    _CURRENT = mesh


def current() -> Optional[Mesh]:
    return _CURRENT


def replica_count() -> int:
    """How many ranks hold the same loss and metric sums (the TP group: every TP rank computes the
    whole loss); a world all-reduce of them is divided by this. SP ranks hold disjoint token shares."""
    return _CURRENT.tp if _CURRENT is not None else 1


def build_mesh(parallel, world_size: int, rank: int) -> Mesh:
    """parallel: config.ParallelConfig. One `error:` line when the world does not split into the mesh."""
    sp, tp = parallel.sequence_parallel_size, parallel.tensor_parallel_size
    if world_size % (sp * tp):
        key = "parallel.sequence_parallel_size" if sp > 1 else "parallel.tensor_parallel_size"
        raise ConfigError(f"{parallel.where(key)}: {key}={sp * tp} does not divide the world size {world_size}; "
                          f"launch a multiple of {sp * tp} ranks (data-parallel size = world / {sp * tp})")
    return Mesh(world_size=world_size, rank=rank, sp=sp, tp=tp)


def _heads(hf_config: Any) -> tuple[Optional[int], Optional[int]]:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv


def check_model(parallel, hf_config: Any) -> None:
    """Heads must split over the SP/TP ranks (one line naming the keys). SP: DeepSpeed's own rule
    (ulysses_sp.py:147-152: heads % SP == 0, and KV heads % SP == 0 or SP % KV heads == 0, the KV
    heads then replicated). TP: heads and KV heads % TP == 0 (stricter than DeepSpeed, which only
    warns when TP > KV heads); architectures AutoTP has a plan for."""
    sp, tp = parallel.sequence_parallel_size, parallel.tensor_parallel_size
    heads, kv = _heads(hf_config)
    if (sp > 1 or tp > 1) and heads is None:
        raise ConfigError(f"parallel: the model ({getattr(hf_config, 'model_type', '?')}) has no num_attention_heads; "
                          "sequence/tensor parallelism supports attention decoders (Llama, Qwen2, Mistral)")
    if sp > 1 and (heads % sp or (kv % sp and sp % kv)):
        raise ConfigError(f"{parallel.where('parallel.sequence_parallel_size')}: parallel.sequence_parallel_size={sp} "
                          f"must divide the model's num_attention_heads={heads}, and divide or be a multiple of its "
                          f"num_key_value_heads={kv}")
    if tp > 1:
        model_type = getattr(hf_config, "model_type", "?")
        if model_type not in TP_ARCHITECTURES:
            raise ConfigError(f"{parallel.where('parallel.tensor_parallel_size')}: parallel.tensor_parallel_size={tp} "
                              f"supports {', '.join(sorted(TP_ARCHITECTURES))} models, not {model_type}")
        if heads % tp or kv % tp:
            raise ConfigError(f"{parallel.where('parallel.tensor_parallel_size')}: parallel.tensor_parallel_size={tp} "
                              f"must divide the model's num_attention_heads={heads} and num_key_value_heads={kv}")


# architectures whose AutoTP sharding llmtrain tests (HF base_model_tp_plan: column q/k/v/gate/up,
# row o/down, vocabulary-sharded lm_head with gathered output)
TP_ARCHITECTURES = {"llama", "qwen2", "mistral"}


def check_zero_stage(parallel, stage: int, ds_path: str) -> None:
    tp = parallel.tensor_parallel_size
    if tp > 1 and stage == 3:
        # DeepSpeed can (engine.py:952), but transformers refuses to load weights with conversions under
        # HfDeepSpeedConfig + autotp_size (integrations/deepspeed.py:345) and llmtrain's export/resume of
        # ZeRO-3 x TP is untested: ZeRO 0-2 as the issue asks
        raise ConfigError(f"{parallel.where('parallel.tensor_parallel_size')}: parallel.tensor_parallel_size={tp} with "
                          f"ZeRO-3 ({ds_path}) is not supported; use ds_configs/zero1.json or zero2.json")
