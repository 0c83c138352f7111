"""The DP x SP x TP mesh without processes: coordinates, the start-up checks, the SP slicing of a
collated batch, the DeepSpeed config blocks and backward scale, and what the planner divides."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, TINY
from llmtrain.config import ConfigError, ParallelConfig, load_config
from llmtrain.data.batching import collate_sequences
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.distributed.mesh import Mesh, build_mesh, check_model, check_zero_stage
from llmtrain.models.sequence_parallel import packed_causal_mask, shard_batch
from llmtrain.train.ds_config import build_ds_config
from llmtrain.train.engine import backward_scale

DEBUG_SFT = os.path.join(REPO, "recipes/debug/sft.yaml")


def test_mesh_coordinates_follow_deepspeeds_consecutive_groups():
    """Ulysses: SP groups range(i*SP, (i+1)*SP) (parallel_state_sp.py:50); AutoTP: a (dp, tp) mesh (groups.py:220)."""
    sp = [Mesh(world_size=8, rank=r, sp=2).coordinates() for r in range(8)]
    assert [c["dp"] for c in sp] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c["sp"] for c in sp] == [0, 1] * 4 and {c["tp"] for c in sp} == {0}
    tp = [Mesh(world_size=8, rank=r, tp=4) for r in range(8)]
    assert [m.dp_rank for m in tp] == [0] * 4 + [1] * 4 and [m.tp_rank for m in tp] == [0, 1, 2, 3] * 2
    assert tp[0].dp == 2 and tp[0].describe() == "mesh DP 2 x SP 1 x TP 4"


def _hf(heads, kv, model_type="llama"):
    from transformers import AutoConfig

    spec = dict(TINY["llama"], num_attention_heads=heads, num_key_value_heads=kv, hidden_size=16 * heads)
    spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


@pytest.mark.parametrize("sp,tp,heads,kv,needle", [
    (3, 1, 4, 2, "parallel.sequence_parallel_size=3 must divide the model's num_attention_heads=4"),
    (4, 1, 8, 3, "num_key_value_heads=3"),
    (1, 4, 4, 2, "parallel.tensor_parallel_size=4 must divide the model's num_attention_heads=4 and num_key_value_heads=2"),
])
def test_heads_that_do_not_split_fail_naming_the_key(sp, tp, heads, kv, needle):
    with pytest.raises(ConfigError) as e:
        check_model(ParallelConfig(sequence_parallel_size=sp, tensor_parallel_size=tp), _hf(heads, kv))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_sp_larger_than_kv_heads_replicates_them_as_deepspeed_does():
    check_model(ParallelConfig(sequence_parallel_size=4), _hf(4, 2))  # 4 % 2 == 0: KV heads replicated
    check_model(ParallelConfig(sequence_parallel_size=2), _hf(4, 2))


def test_tp_of_an_untested_architecture_or_under_zero3_fails_in_one_line():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="supports llama, mistral, qwen2 models, not gpt2"):
        check_model(ParallelConfig(tensor_parallel_size=2), GPT2Config(n_head=4))
    with pytest.raises(ConfigError, match="ZeRO-3 .* is not supported; use ds_configs/zero1.json or zero2.json"):
        check_zero_stage(ParallelConfig(tensor_parallel_size=2), 3, "ds_configs/zero3.json")
    check_zero_stage(ParallelConfig(tensor_parallel_size=2), 2, "ds_configs/zero2.json")


def test_world_not_divisible_by_the_mesh_fails():
    with pytest.raises(ConfigError, match="parallel.sequence_parallel_size=2 does not divide the world size 3"):
        build_mesh(ParallelConfig(sequence_parallel_size=2), 3, 0)
    assert build_mesh(ParallelConfig(tensor_parallel_size=2), 4, 3).coordinates() == {"dp": 1, "sp": 0, "tp": 1}


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.sequence_parallel_size=2", "parallel.tensor_parallel_size=2"], "cannot combine Ulysses SP and AutoTP"),
    (["parallel.sequence_parallel_size=2", "model.attn_implementation=eager"], "model.attn_implementation='eager' is not supported"),
    (["parallel.tensor_parallel_size=2", "train.loss_chunk_tokens=512"], "train.loss_chunk_tokens=512 must be 0"),
    (["parallel.sequence_parallel_size=4", "data.max_seq_len=3"], "data.max_seq_len=3 is below parallel.sequence_parallel_size=4"),
    (["parallel.sequence_parallel_size=0"], "parallel.sequence_parallel_size=0 must be >= 1"),
])
def test_impossible_combinations_fail_at_load_naming_the_keys(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG_SFT, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _packed_batch():
    """Two packed rows of several samples (15 and 12 tokens; width 15): the row middles fall inside samples."""
    rng = np.random.default_rng(0)
    rows = []
    for lengths in ([4, 6, 5], [7, 5]):
        row = []
        for n in lengths:
            ids = rng.integers(5, 100, n)
            labels = ids.copy()
            labels[:2] = IGNORE_INDEX  # a masked prompt
            row.append((ids, labels))
        rows.append(row)
    return collate_sequences(rows, pad_id=0), rows


@pytest.mark.parametrize("sp", [2, 3, 4])
def test_sp_slices_reassemble_the_whole_row_with_labels_shifted_before_the_split(sp):
    batch, rows = _packed_batch()
    shards = [shard_batch(batch, sp, r) for r in range(sp)]
    assert len({s["input_ids"].shape for s in shards}) == 1  # equal slices (the all-to-all needs them)
    ids = torch.cat([s["input_ids"] for s in shards], 1)[0]
    targets = torch.cat([s["targets"] for s in shards], 1)[0].tolist()
    seq_t = torch.cat([s["target_seq_index"] for s in shards], 1)[0].tolist()
    pos = torch.cat([s["position_ids"] for s in shards], 1)[0].tolist()
    # independent: walk the samples; the target of position t is token t+1 of the same sample if trained
    exp_ids, exp_t, exp_s, exp_pos, k = [], [], [], [], 0
    for row in rows:
        for ids_, labels in row:
            for i in range(len(ids_)):
                exp_ids.append(int(ids_[i]))
                exp_pos.append(i)
                nxt = int(labels[i + 1]) if i + 1 < len(ids_) else IGNORE_INDEX
                exp_t.append(nxt)
                exp_s.append(k if nxt != IGNORE_INDEX else -1)
            k += 1
        pad = 15 - sum(len(i) for i, _ in row)
        exp_ids += [0] * pad
        exp_pos += list(range(exp_pos[-1] + 1, exp_pos[-1] + 1 + pad))
        exp_t += [IGNORE_INDEX] * pad
        exp_s += [-1] * pad
    extra = -len(exp_ids) % sp
    exp_pos += list(range(exp_pos[-1] + 1, exp_pos[-1] + 1 + extra))
    assert ids.tolist() == exp_ids + [0] * extra
    assert targets == exp_t + [IGNORE_INDEX] * extra
    assert seq_t == exp_s + [-1] * extra
    assert pos == exp_pos
    # every target counted once over the SP ranks: the global normaliser needs no communication
    assert sum(int((s["targets"] != IGNORE_INDEX).sum()) for s in shards) == sum(t != IGNORE_INDEX for t in exp_t)
    cu = shards[0]["cu_seq_lens"]
    assert int(cu[-1]) == len(exp_ids) + extra and shards[0]["max_segment_len"] == max(7, extra)
    # a slice's last token predicts the next slice's first where a sample crosses the split (sp=2: the
    # split falls between the two flattened rows here)
    chunk = len(pos) // sp
    crossing = [c for c in range(chunk, len(pos), chunk) if exp_t[c - 1] != IGNORE_INDEX]
    assert all(exp_t[c - 1] == exp_ids[c] for c in crossing) and (crossing or sp == 2)


def test_packed_causal_mask_keeps_samples_apart():
    """Against the samples' own indices: query i sees key j exactly when both are in one sample and j <= i."""
    batch, _ = _packed_batch()
    mask = packed_causal_mask(batch["position_ids"].reshape(1, -1))[0, 0]  # (S, S)
    seq = batch["seq_index"].reshape(-1)
    real = seq >= 0
    same = (seq[:, None] == seq[None, :]) & torch.ones_like(mask).tril().bool()
    assert torch.equal(mask[real][:, real], same[real][:, real])
    assert not mask[real][:, ~real].any()  # no real token looks at padding (it only follows its row)


def test_deepspeed_config_blocks_and_batch_sizes_per_mesh(tmp_path):
    cfg = load_config(DEBUG_SFT, ["train.micro_batch_size=2", "train.grad_accum=3"])
    z3 = cfg.deepspeed.__class__(config=os.path.join(REPO, "ds_configs/zero3.json"))
    ds = build_ds_config(cfg.train, z3, 4, torch.device("cpu"), Mesh(world_size=4, rank=0, sp=2))
    # with the SP mpu DeepSpeed counts world / SP ranks (config.py:458); ZeRO-3 pinned to reduce_scatter
    assert ds["train_batch_size"] == 2 * 3 * 2 and ds["sequence_parallel_size"] == 2
    assert ds["zero_optimization"]["reduce_scatter"] is True and "tensor_parallel" not in ds
    z2 = cfg.deepspeed.__class__(config=os.path.join(REPO, "ds_configs/zero2.json"))
    ds = build_ds_config(cfg.train, z2, 4, torch.device("cpu"), Mesh(world_size=4, rank=0, tp=2))
    # AutoTP passes no mpu: DeepSpeed's batch check counts every rank (config.py:470)
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["tensor_parallel"] == {"autotp_size": 2}
    bad = tmp_path / "z.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 4}))
    with pytest.raises(ConfigError, match="remove 'sequence_parallel_size'; llmtrain sets it from parallel"):
        build_ds_config(cfg.train, cfg.deepspeed.__class__(config=str(bad)), 4, torch.device("cpu"),
                        Mesh(world_size=4, rank=0, sp=2))


def test_backward_scale_undoes_deepspeeds_averaging_per_mesh():
    assert backward_scale(grad_accum=2, data_parallel_size=3) == 6
    assert backward_scale(2, 1, sp_size=2, stage=2) == 2  # averaged over DP = world / SP
    assert backward_scale(2, 1, sp_size=2, stage=3) == 4  # ZeRO-3 reduce_scatter divides by the whole world


def test_resume_at_another_tp_size_is_one_line(tmp_path):
    from llmtrain.train.runner import check_resume_tp

    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "tensor_parallel_size": 2}))
    cfg = load_config(DEBUG_SFT, [])
    with pytest.raises(ConfigError) as e:
        check_resume_tp(cfg, str(ckpt))
    assert "parallel.tensor_parallel_size=1 but the checkpoint" in str(e.value) and "written with 2" in str(e.value)
    check_resume_tp(load_config(DEBUG_SFT, ["parallel.tensor_parallel_size=2"]), str(ckpt))


def test_planner_divides_activations_by_sp_and_linear_states_by_tp():
    from llmtrain.tools.memory_plan import ModelShape, activation_bytes, params_per_rank

    shape = ModelShape(params=1000, largest_layer_params=10, hidden=64, layers=2, heads=4, vocab=512, linear_params=800)
    full = activation_bytes(shape, 1, 4096, checkpointing=False)
    assert activation_bytes(shape, 1, 4096, checkpointing=False, sp=2) == pytest.approx(full / 2)
    # Korthikanti eq. 3: 10 + 24/t bytes per token x hidden per layer; logits whole on every TP rank
    logits = 4096 * 512 * 8
    assert activation_bytes(shape, 1, 4096, False, tp=2) - logits == pytest.approx(2 * 4096 * 64 * 22)
    assert params_per_rank(shape, 4) == 200 + 200


def test_plan_reports_the_mesh_and_refuses_what_the_run_would_refuse():
    from llmtrain.tools.memory_plan import report

    def act(text):  # the ZeRO-1 row's activations column
        row = next(line for line in text.splitlines() if line.startswith("| 1 | none |"))
        return float(row.split("|")[4])

    base = report(load_config(DEBUG_SFT, []), gpus=4, gpu_mem_gib=80)
    sp2 = report(load_config(DEBUG_SFT, ["parallel.sequence_parallel_size=2"]), gpus=4, gpu_mem_gib=80)
    assert "mesh DP 2 x SP 2 x TP 1 over 4 GPU(s)" in sp2
    assert act(sp2) == pytest.approx(act(base) / 2, rel=0.1)  # printed to 3 decimals
    with pytest.raises(ConfigError, match="must divide the model's num_attention_heads=4"):
        report(load_config(DEBUG_SFT, ["parallel.sequence_parallel_size=3"]), gpus=3, gpu_mem_gib=80)
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        report(load_config(DEBUG_SFT, ["parallel.tensor_parallel_size=4"]), gpus=6, gpu_mem_gib=80)


@pytest.mark.parametrize("task,key", [("reward", "parallel.sequence_parallel_size"), ("rl", "parallel.tensor_parallel_size")])
def test_tasks_without_model_parallel_refuse_sp_and_tp_with_one_line_before_starting(task, key):
    from llmtrain.config import ConfigError, load_config
    from llmtrain.objectives import OBJECTIVES
    from llmtrain.train import runner

    recipe = os.path.join(REPO, "recipes/debug", "reward.yaml" if task == "reward" else "grpo.yaml")
    cfg = load_config(recipe, [f"{key}=2"])
    with pytest.raises(ConfigError) as e:
        runner.setup(cfg, OBJECTIVES[task].from_config(cfg))
    assert key in str(e.value) and "\n" not in str(e.value)
