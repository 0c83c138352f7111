"""Resume at another world size (ZeRO 1-3 via DeepSpeed universal checkpoints): exact losses, RNG rule,
pruning, stale copies never used, foreign checkpoints refused, nothing unpickled."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, REPO, base_recipe, free_port, python_cmd, read_metrics, run_cmd, write_recipe
from llmtrain.train import checkpoint, universal
from llmtrain.config import ConfigError, load_config

# Resumed steps must match an uninterrupted run to this relative tolerance: fp32 on CPU, where only
# the summation order differs (2 ranks' all-reduce vs 1 rank's accumulation); seen: ~1e-7.
LOSS_RTOL = 1e-5


def launch(ranks: int, recipe_path: str, *overrides: str):
    if ranks == 1:
        cmd = python_cmd("launch/sft.py", "--recipe", recipe_path, *overrides)
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               os.path.join(REPO, "launch/sft.py"), "--recipe", recipe_path, *overrides]
    return run_cmd(cmd, timeout=300)


def losses(output_dir: str) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def torch_rng(ckpt: str, rank: int) -> torch.Tensor:
    return torch.load(os.path.join(ckpt, "rng", f"rank_{rank}.pt"), weights_only=True)["torch"]


def mark_rng(ckpt: str, rank: int) -> torch.Tensor:
    """Give rank `rank` a recognisable torch generator state in the checkpoint (nothing in these runs draws
    random numbers: no dropout), so the resumed run's next checkpoint shows whether it was carried."""
    path = os.path.join(ckpt, "rng", f"rank_{rank}.pt")
    state = torch.load(path, weights_only=True)
    state["torch"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(state, path)
    return state["torch"]


class Evil:
    """Unpickling this creates a file: proof that a load ran code."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def final_weights(output_dir: str) -> dict:
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def uninterrupted_then_cut(tmp_path, tiny_model_dir, stage: int, ranks: int, grad_accum: int, **train):
    """Run 4 steps (checkpoints at 2 and 4) and return (recipe path, output_dir, losses, final weights);
    then drop step 4 and final/ as if the job had died after its step-2 checkpoint."""
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=4, grad_accum=grad_accum, save_every=2, keep_last=5,
                         **train)
    recipe["deepspeed"]["config"] = os.path.join(REPO, f"ds_configs/zero{stage}.json")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = launch(ranks, path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = recipe["output_dir"]
    weights = final_weights(out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step_00000004"))
    shutil.rmtree(os.path.join(out, "final"))
    return path, out, losses(out), weights


@pytest.mark.multiproc
def test_two_ranks_zero2_resume_on_one_rank_reproduces_uninterrupted_losses(tiny_model_dir, tmp_path):
    """2 ranks x accumulation 1 -> 1 rank x accumulation 2 (same global batch); then a tampered universal
    copy is refused instead of unpickled."""
    path, out, reference, _ = uninterrupted_then_cut(tmp_path, tiny_model_dir, stage=2, ranks=2, grad_accum=1)
    ck = os.path.join(out, "checkpoints")
    rank0_rng = mark_rng(os.path.join(ck, "step_00000002"), 0)
    proc = launch(1, path, "train.grad_accum=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "converting" in proc.stdout and "rank 0 continues its saved RNG streams" in proc.stdout
    resumed = losses(out)
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], rel=LOSS_RTOL)
    # rank 0 carried its generators across the world-size change
    assert torch.equal(torch_rng(os.path.join(ck, "step_00000004"), 0), rank0_rng)
    copy = os.path.join(ck, "step_00000002_universal")
    assert universal.is_current(copy, os.path.join(ck, "step_00000002"))

    # the universal load unpickles nothing: a copy whose optimizer state holds code is refused
    sentinel = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": Evil(str(sentinel))}, os.path.join(copy, "zero", "optimizer_state.pt"))
    proc = launch(1, path, "train.grad_accum=2", f"train.resume={os.path.join(ck, 'step_00000002')}")
    assert not sentinel.exists(), "a universal-checkpoint load ran pickled code"
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "refusing to unpickle" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.multiproc
def test_one_rank_zero3_resume_on_two_ranks_reproduces_uninterrupted_losses(tiny_model_dir, tmp_path):
    """1 rank x accumulation 2 -> 2 ranks x accumulation 1 under ZeRO-3 (parameters partitioned); the
    universal copy is pruned with its checkpoint; rank 1 (new) starts from its derived seed. The final
    weights equal the uninterrupted run's, with weight decay on: DeepSpeed's ZeRO-3 universal load shares
    one Adam step counter between the param groups and gives the no-decay group the decay group's
    settings (optim.repair_zero3_universal_load undoes both; without it the weights are ~1e-3 off)."""
    path, out, reference, weights = uninterrupted_then_cut(tmp_path, tiny_model_dir, stage=3, ranks=1, grad_accum=2,
                                                           weight_decay=1.0)
    ck = os.path.join(out, "checkpoints")
    rank0_rng = mark_rng(os.path.join(ck, "step_00000002"), 0)
    proc = launch(2, path, "train.grad_accum=1", "train.keep_last=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "converting" in proc.stdout and "ZeRO-3" in proc.stdout
    resumed = losses(out)
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], rel=LOSS_RTOL)
    after = final_weights(out)
    for k in weights:  # norms (no decay) and matrices (decay) alike
        assert ((after[k] - weights[k]).norm() / weights[k].norm()).item() < 1e-5, k
    # keep_last=1: step 2 went at the step-4 save, and its full fp32 universal copy with it
    assert sorted(n for n in os.listdir(ck) if n.startswith("step_")) == ["step_00000004"]
    new4 = os.path.join(ck, "step_00000004")
    assert torch.equal(torch_rng(new4, 0), rank0_rng)
    torch.manual_seed(checkpoint.derived_seed(1, 2, 1))  # train.seed=1 (base_recipe), step 2, rank 1
    assert torch.equal(torch_rng(new4, 1), torch.get_rng_state())


# --------------------------------------------------------------------------- without launches


def fake_checkpoint(root, step: int, run_id="run-a", save_id="save-1") -> str:
    path = os.path.join(root, checkpoint.tag_for(step))
    os.makedirs(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "run_id": run_id, "save_id": save_id, "world_size": 2}, f)
    open(os.path.join(path, checkpoint.COMPLETE), "w").close()
    return path


def fake_universal(root, source: str, save_id: str) -> str:
    out = universal.universal_dir(root, source)
    os.makedirs(out)
    with open(os.path.join(out, checkpoint.COMPLETE), "w") as f:
        json.dump({"source": os.path.realpath(source), "save_id": save_id}, f)
    return out


def test_a_universal_copy_of_an_older_save_under_the_same_tag_is_never_used(tmp_path):
    root = str(tmp_path)
    source = fake_checkpoint(root, 2, save_id="second-save")
    assert not universal.is_current(fake_universal(root, source, "first-save"), source)
    shutil.rmtree(universal.universal_dir(root, source))
    assert universal.is_current(fake_universal(root, source, "second-save"), source)
    with open(os.path.join(universal.universal_dir(root, source), checkpoint.COMPLETE), "w"):
        pass  # an older llmtrain's empty marker: no proof of origin, so converted again
    assert not universal.is_current(universal.universal_dir(root, source), source)


def test_universal_copies_are_pruned_with_their_checkpoints(tmp_path):
    root = str(tmp_path)
    for step in (2, 4):
        fake_universal(root, fake_checkpoint(root, step), "save-1")
    os.makedirs(os.path.join(root, "step_00000001_universal"))  # its checkpoint is long gone
    checkpoint.prune(root, keep_last=1)
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000004_universal"]


def _cfg(tmp_path, *overrides):
    return load_config(None, ["model.name_or_path=x", "data.train=[x]", f"output_dir={tmp_path / 'run'}", *overrides])


def test_converting_a_checkpoint_of_another_run_is_refused_unless_allowed(tmp_path):
    cfg = _cfg(tmp_path)
    os.makedirs(cfg.output_dir)
    run_id = checkpoint.write_run_id(cfg.output_dir, fresh=True)
    own = fake_checkpoint(checkpoint.ckpt_root(cfg), 2, run_id=run_id)
    universal.check_origin(cfg, own, checkpoint.saved_state(own))  # this run's own: fine
    outside = fake_checkpoint(str(tmp_path / "elsewhere"), 2, run_id=run_id)
    copied_in = fake_checkpoint(checkpoint.ckpt_root(cfg), 4, run_id="someone-else")
    legacy = fake_checkpoint(checkpoint.ckpt_root(cfg), 6, run_id=None)
    for path, why in ((outside, "lies outside"), (copied_in, "names run someone-else"), (legacy, "no run identity")):
        with pytest.raises(ConfigError, match="train.resume_allow_foreign=true") as e:
            universal.check_origin(cfg, path, checkpoint.saved_state(path))
        assert why in str(e.value) and "\n" not in str(e.value)
        universal.check_origin(_cfg(tmp_path, "train.resume_allow_foreign=true"), path, checkpoint.saved_state(path))


def test_the_converter_unpickles_nothing_and_leaves_nothing_when_it_fails(tmp_path):
    """DeepSpeed's own converter runs the pickled code (the control); ours refuses with one line."""
    source = str(tmp_path / "step_00000002")
    os.makedirs(source)
    sentinel = tmp_path / "code-ran"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"optimizer_state_dict": Evil(str(sentinel))}, os.path.join(source, name))
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
                    "--output_folder", str(tmp_path / "plain"), "--num_extract_workers", "1"],
                   capture_output=True, env=env, timeout=300)
    assert sentinel.exists(), "control: DeepSpeed's converter should have unpickled the file"
    sentinel.unlink()
    out = str(tmp_path / "step_00000002_universal")
    with pytest.raises(ConfigError, match="Weights only load failed") as e:
        universal._convert_once(source, out)  # rank 0's part of universal.prepare
    assert not sentinel.exists() and "\n" not in str(e.value)
    assert not os.path.exists(out)


GiB = 2**30


def test_converter_workers_are_bounded_by_cpus_shards_and_memory():
    """plan_workers against hand-computed counts: min(CPUs, 8), extract <= shard files, and
    available // (1.5 x shard) extract, available // (3 x largest fp32 parameter) merge workers, >= 1."""
    # a 70B full fine-tune on 64 ranks: 13 GiB shards, a 4.2 GB embedding, a 2 TiB node: 8 and 8
    assert universal.plan_workers(224, 2048 * GiB, 64, 13 * GiB, int(4.2e9)) == (8, 8)
    # memory-bound: 100 GiB for 20 GiB shards -> 100 // 30 = 3 extract; 100 // 12 = 8 merge
    assert universal.plan_workers(16, 100 * GiB, 8, 20 * GiB, 4 * GiB) == (3, 8)
    # too little for even one: still one of each (the serial converter), never zero
    assert universal.plan_workers(16, 10 * GiB, 8, 20 * GiB, 4 * GiB) == (1, 1)
    # CPU- and shard-bound
    assert universal.plan_workers(2, 100 * GiB, 2, GiB, GiB) == (2, 2)
    assert universal.plan_workers(16, 100 * GiB, 1, GiB, GiB) == (1, 8)
    assert universal.plan_workers(16, 0, 8, GiB, GiB) == (1, 1)  # memory unknown


def test_converter_reads_the_largest_parameter_without_loading_tensors_or_running_code(tmp_path):
    from collections import OrderedDict

    good = tmp_path / "good"
    os.makedirs(good)
    shapes = [OrderedDict(embed=torch.Size([128, 64]), norm=torch.Size([64])), OrderedDict(head=torch.Size([64, 100]))]
    torch.save({"module": {"embed": torch.zeros(128, 64)}, "param_shapes": shapes},
               good / "mp_rank_00_model_states.pt")
    torch.save({"x": torch.zeros(10)}, good / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert universal._largest_param_numel(str(good)) == 128 * 64
    extract, merge, why = universal.converter_workers(str(good))
    assert extract == 1 and merge >= 1 and "1 shard(s)" in why
    evil = tmp_path / "evil"
    os.makedirs(evil)
    sentinel = tmp_path / "code-ran"
    torch.save({"param_shapes": Evil(str(sentinel))}, evil / "mp_rank_00_model_states.pt")
    assert universal._largest_param_numel(str(evil)) == 0 and not sentinel.exists()  # unknown -> 1 merge worker
    assert universal.converter_workers(str(evil))[1] == 1


def test_a_zero3_partial_optimizer_offload_is_not_resumed_at_another_world_size(tmp_path):
    """offload_optimizer.ratio < 1 keeps some sub-groups' optimizer on the GPU, whose state DeepSpeed's
    ZeRO-3 universal load never restores: one line before any conversion; ratio 1 goes on to convert."""
    from types import SimpleNamespace

    from llmtrain.train import runner

    cfg = _cfg(tmp_path)
    os.makedirs(cfg.output_dir)
    path = fake_checkpoint(checkpoint.ckpt_root(cfg), 2, run_id=checkpoint.write_run_id(cfg.output_dir, fresh=True))
    info = SimpleNamespace(world_size=1)
    partial = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}
    with pytest.raises(ConfigError, match="offload_optimizer.ratio is 0.3") as e:
        runner._universal_if_resized(cfg, info, partial, path)
    assert "\n" not in str(e.value)
    same_world = SimpleNamespace(world_size=2)  # the saved world size: loaded as it is
    assert runner._universal_if_resized(cfg, same_world, partial, path) == path
