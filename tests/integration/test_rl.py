"""Online RL (llmtrain rl): 2 ranks under ZeRO-3 (every parameter partitioned) == 1 rank with
accumulation, step by step, including the rollouts sampled after updates; an interrupted run
resumes to the same losses (the keyed sampler needs no RNG state); ratio 1, nothing clipped and
KL 0 on the first inner step; greedy and sampled generation under ZeRO-3 == the unsharded model.
PPO (rl.advantage=gae): the same two invariants for the policy *and* the critic (its own engine,
optimizer and checkpoint), with whitening over both ranks' tokens."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, REPO, free_port, have, python_cmd, read_metrics, run_cmd, write_recipe

REWARDS = '''
def digits(prompts, completions, answer, **_):
    return [sum(ch.isdigit() for ch in c) / 3.0 for c in completions]

def length(prompts, completions, **_):
    return [float(len(c) % 4) for c in completions]
'''


def rl_recipe(tmp_path, model_dir, out, ds_config, **train):
    return {
        "output_dir": str(out),
        "model": {"name_or_path": model_dir},
        "data": {"train": [os.path.join(REPO, "data/demo/rl_train.jsonl")], "eval": [str(tmp_path / "eval7.jsonl")]},
        "train": {"max_steps": 8, "seed": 3, "micro_batch_size": 1, "lr": 2e-3, "warmup_steps": 0,
                  "schedule": "constant", "log_every": 1, "save_every": 4, **train},
        "rl": {"num_generations": 2, "prompts_per_step": 4, "max_new_tokens": 6, "ppo_epochs": 2, "mini_batches": 2,
               "kl_coef": 0.1, "kl_type": "k3", "reward_fns": ["toy_rewards:digits", "toy_rewards:length"],
               "reward_weights": [1.0, 0.5], "generation_batch_size": 3},
        "deepspeed": {"config": ds_config},
        "logging": {"progress": False},
    }


def run_rl(tmp_path, recipe, name, ranks=1, env=None, launcher="torchrun"):
    """launch/rl.py on 1 rank (python) or `ranks` ranks under torchrun, deepspeed or mpirun (the resumed
    halves of the multi-rank runs use the other launchers: the same run continues under any of them)."""
    path = write_recipe(tmp_path / name, recipe)
    script = os.path.join(REPO, "launch/rl.py")
    port = str(free_port())
    if ranks == 1:
        cmd = python_cmd("launch/rl.py")
    elif launcher == "deepspeed":
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, script]
    elif launcher == "mpirun" and have("mpirun"):
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), "-x", "OMP_NUM_THREADS=1",
               "-x", "PATH", "-x", "PYTHONPATH", "-x", f"MASTER_PORT={port}", *python_cmd("launch/rl.py")]
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", port, script]
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", **(env or {})}
    proc = run_cmd(cmd + ["--recipe", path], timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def steps(out):
    return [r for r in read_metrics(out) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    (tmp / "toy_rewards.py").write_text(REWARDS)
    with open(os.path.join(REPO, "data/demo/sft_eval.jsonl")) as f:  # 7 eval prompts: 4 + 3 on two ranks
        (tmp / "eval7.jsonl").write_text("".join(f.readlines()[:7]))
    z3 = tmp / "zero3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    one = rl_recipe(tmp, tiny_model_dir, tmp / "one", os.path.join(REPO, "ds_configs/zero0.json"), grad_accum=4)
    one["rl"]["oversample"] = 2  # dynamic sampling: 2 candidate prompts per slot, the same choice on any world size
    run_rl(tmp, one, "one.yaml")
    # stopped at step 6, inside the second rollout (4 steps each): the resume continues that rollout from the
    # samples the checkpoint keeps per rank (checkpoints/step_6/data/rank_<r>.pt), it does not regenerate them
    two = rl_recipe(tmp, tiny_model_dir, tmp / "two", str(z3), grad_accum=2, max_steps=6)
    two["rl"]["oversample"] = 2
    two["rl"]["zero3_gather"] = False  # the hooks path (synced_gpus; eval pads the rank with fewer prompts)
    first = run_rl(tmp, two, "two_a.yaml", ranks=2)
    rows_before = steps(two["output_dir"])
    assert all(os.path.isfile(os.path.join(two["output_dir"], "checkpoints", "step_00000006", "data", f"rank_{r}.pt"))
               for r in (0, 1))
    resumed = run_rl(tmp, {**two, "train": {**two["train"], "max_steps": 8}}, "two_b.yaml", ranks=2, launcher="deepspeed")
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and "regenerated" not in log
    return {"one": one["output_dir"], "two": two["output_dir"], "two_first_rows": rows_before,
            "log": first.stdout + first.stderr}


def test_two_ranks_zero3_equal_one_rank_with_accumulation_and_resume(runs):
    one = steps(runs["one"])
    two = runs["two_first_rows"] + [r for r in steps(runs["two"]) if r["step"] > 6]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):  # steps 7-8 of `two` come from the resumed run, inside the second rollout
        for key in ("loss", "policy_loss", "kl", "clip_frac", "ratio", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    rollouts = [(a, b) for a, b in zip(one, two) if "reward" in a]
    assert [a["step"] for a, _ in rollouts] == [1, 5] and all("reward" in b for _, b in rollouts)
    for a, b in rollouts:  # the same completions: the keyed sampler is rank- and resume-invariant
        for key in ("reward", "reward_std", "reward_digits", "reward_length", "completion_len", "zero_var_groups"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), (a["step"], key)
    assert len({r["reward"] for _, r in rollouts}) == 2 and one[0]["reward_std"] > 0  # a real signal
    for a, b in rollouts:  # dynamic sampling: the chosen groups have signal wherever a candidate had
        assert a["oversample_informative"] == pytest.approx(b["oversample_informative"], abs=1e-12)
        assert a["zero_var_groups"] <= 1 - a["oversample_informative"] + 1e-9  # a slot without signal had none
    ev1, ev2 = ([r for r in read_metrics(runs[k]) if "eval_reward" in r][-1] for k in ("one", "two"))
    assert ev1 == pytest.approx(ev2, abs=1e-9)  # greedy eval of 7 prompts on 1 rank == 4 + 3 on 2 ranks
    w1 = load_file(os.path.join(runs["one"], "final", "model.safetensors"))
    w2 = load_file(os.path.join(runs["two"], "final", "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_first_inner_step_has_ratio_one_no_clipping_and_zero_kl(runs):
    one = steps(runs["one"])
    first = one[0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0.0
    assert abs(first["kl"]) < 1e-7  # the frozen reference is the starting policy
    assert any(abs(r["ratio"] - 1) > 1e-5 for r in one[1:4])  # later inner steps use the rollout's old log-probs
    assert one[4]["ratio"] == pytest.approx(1.0, abs=1e-6)  # a new rollout: ratio 1 again
    assert one[-1]["kl"] > 0
    evals = [r for r in read_metrics(runs["one"]) if "eval_reward" in r]
    assert evals and "eval_reward_digits" in evals[-1]


def tiny_critic(model_dir: str, out) -> str:
    """A sequence-classification model on the tiny policy's trunk with a random (seeded) score head,
    standing in for a launch/reward.py final/."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(11)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.mul_(3)  # values of order 1, so the value loss and its clipping have work to do
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def ppo_runs(tiny_model_dir, tmp_path_factory):
    """1 rank (ZeRO-0, accumulation 4) vs 2 ranks (ZeRO-3, all partitioned) stopped after the first rollout
    and resumed: rollouts of 2 steps (2 epochs x 1 mini-batch), 4 steps."""
    tmp = tmp_path_factory.mktemp("ppo")
    (tmp / "toy_rewards.py").write_text(REWARDS)
    with open(os.path.join(REPO, "data/demo/sft_eval.jsonl")) as f:
        (tmp / "eval7.jsonl").write_text("".join(f.readlines()[:7]))
    z3 = tmp / "zero3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    critic = tiny_critic(tiny_model_dir, tmp / "critic")
    ppo = {"advantage": "gae", "critic": critic, "kl_type": "k1", "kl_coef": 0.05, "gamma": 0.9, "lam": 0.8,
           "value_clip": 0.05, "critic_lr": 5e-4, "ppo_epochs": 2, "mini_batches": 1}

    def recipe(out, ds_config, **train):
        r = rl_recipe(tmp, tiny_model_dir, tmp / out, ds_config, **{"micro_batch_size": 2, "max_steps": 4,
                                                                    "save_every": 2, **train})
        r["rl"].update(ppo)
        return r

    one = recipe("one", os.path.join(REPO, "ds_configs/zero0.json"), grad_accum=4)
    run_rl(tmp, one, "one.yaml")
    two = recipe("two", str(z3), grad_accum=2, max_steps=2)
    run_rl(tmp, two, "two_a.yaml", ranks=2)
    rows_before = steps(two["output_dir"])
    resumed = run_rl(tmp, {**two, "train": {**two["train"], "max_steps": 4}}, "two_b.yaml", ranks=2, launcher="mpirun")
    assert "resumed from" in resumed.stdout + resumed.stderr
    rows_two = steps(two["output_dir"])
    # the 2-rank run resumed on 1 rank (through DeepSpeed's universal format: the policy's and the critic's
    # ZeRO-3 shards converted) vs the 1-rank run resumed on 1 rank: steps 5-6, a new rollout
    longer = {"max_steps": 6, "grad_accum": 4}
    run_rl(tmp, {**one, "train": {**one["train"], **longer}}, "one_b.yaml")
    resized = run_rl(tmp, {**two, "train": {**two["train"], **longer}}, "two_c.yaml")
    log = resized.stdout + resized.stderr
    assert "loading it through a universal checkpoint" in log and "resumed from" in log, log[-2000:]
    assert os.path.isdir(os.path.join(two["output_dir"], "checkpoints", "step_00000004_universal", "critic", "zero"))
    return {"one": one["output_dir"], "two": two["output_dir"], "two_first_rows": rows_before, "two_rows": rows_two}


def test_ppo_two_ranks_zero3_equal_one_rank_with_accumulation_and_resume(ppo_runs):
    one = [r for r in steps(ppo_runs["one"]) if r["step"] <= 4]
    two = ppo_runs["two_first_rows"] + [r for r in ppo_runs["two_rows"] if r["step"] > 2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    keys = ("loss", "policy_loss", "value_loss", "value", "return", "value_clip_frac", "kl", "clip_frac", "ratio",
            "entropy")
    for a, b in zip(one, two):  # steps 3-4 of `two` come from the resumed run: its critic from critic/
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    rollouts = [(a, b) for a, b in zip(one, two) if "reward" in a]
    assert [a["step"] for a, _ in rollouts] == [1, 3]
    for a, b in rollouts:  # whitening, explained variance: moments of both ranks' tokens
        for key in ("reward", "rollout_value", "rollout_return", "explained_var", "kl_k1_seq"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    first = one[0]  # the first inner step: policy and critic at the rollout's weights
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0.0
    assert first["value_clip_frac"] == 0.0 and abs(first["kl"]) < 1e-7
    assert one[1]["value_clip_frac"] > 0  # the second epoch: the critic moved past the clip range somewhere
    assert one[2]["rollout_value"] != pytest.approx(one[0]["rollout_value"])  # the trained critic valued rollout 2
    assert os.path.isdir(os.path.join(ppo_runs["two"], "checkpoints", "step_00000004", "critic"))


def test_ppo_resumed_at_another_world_size_continues_policy_and_critic(ppo_runs):
    """Steps 5-6 on 1 rank, resumed from the 2-rank ZeRO-3 checkpoint (universal conversion of both engines)
    == resumed from the 1-rank checkpoint: the critic's weights *and* Adam moments came through (step 6's
    value loss depends on them), and final/ (policy and critic) agree."""
    one, two = ([r for r in steps(ppo_runs[k]) if r["step"] > 4] for k in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [5, 6]
    assert "reward" in one[0] and "explained_var" in two[0]
    for a, b in zip(one, two):
        for key in ("loss", "policy_loss", "value_loss", "value", "return", "value_clip_frac", "kl", "ratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    for key in ("reward", "rollout_value", "rollout_return", "explained_var"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-4, abs=1e-6), key
    for name in ("model.safetensors", "critic/model.safetensors"):
        w1 = load_file(os.path.join(ppo_runs["one"], "final", name))
        w2 = load_file(os.path.join(ppo_runs["two"], "final", name))
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5, name


def test_ppo_critic_export_loads_as_a_reward_model(ppo_runs):
    """final/critic/ is a sequence-classification directory: RewardScorer reads it, and its score of a
    sequence changed from the starting critic's (it was trained)."""
    from llmtrain.objectives.reward_scoring import RewardScorer

    ids = [[5, 17, 23, 42, 9]]
    trained = RewardScorer.load(os.path.join(ppo_runs["one"], "final", "critic")).score_tokens(ids)
    start = RewardScorer.load(os.path.join(os.path.dirname(ppo_runs["one"]), "critic")).score_tokens(ids)
    assert trained.shape == (1,) and abs(float(trained[0] - start[0])) > 1e-4


def test_packed_rollouts_train_like_one_sequence_per_row(runs, ppo_runs, tiny_model_dir, tmp_path):
    """data.packing: each micro-batch's sequences share rows (position ids restart per sequence) -- GRPO (old
    and reference log-probs) and PPO (the critic's values too), 1 rank under ZeRO-3 with whole steps in one
    micro-batch == the unpacked 1-rank ZeRO-0 runs with one (GRPO) or two (PPO) sequences per micro-batch."""
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    with open(os.path.join(REPO, "data/demo/sft_eval.jsonl")) as f:
        (tmp_path / "eval7.jsonl").write_text("".join(f.readlines()[:7]))
    z3 = os.path.join(REPO, "ds_configs/zero3.json")
    grpo = rl_recipe(tmp_path, tiny_model_dir, tmp_path / "grpo", z3, micro_batch_size=4, grad_accum=1)
    grpo["data"].update(packing=True, max_seq_len=256, max_prompt_len=64)
    grpo["rl"]["oversample"] = 2  # as runs["one"]
    log = run_rl(tmp_path, grpo, "grpo.yaml")
    assert "packed into rows of <= 256 tokens" in log.stdout + log.stderr
    ppo = rl_recipe(tmp_path, tiny_model_dir, tmp_path / "ppo", z3, micro_batch_size=8, grad_accum=1, max_steps=4,
                    save_every=2)
    ppo["data"].update(packing=True, max_seq_len=256, max_prompt_len=64)
    ppo["rl"].update(advantage="gae", critic=os.path.join(os.path.dirname(ppo_runs["one"]), "critic"), kl_type="k1",
                     kl_coef=0.05, gamma=0.9, lam=0.8, value_clip=0.05, critic_lr=5e-4, ppo_epochs=2, mini_batches=1)
    run_rl(tmp_path, ppo, "ppo.yaml")
    pairs = [(runs["one"], grpo["output_dir"], ("loss", "policy_loss", "kl", "clip_frac", "ratio", "entropy")),
             (ppo_runs["one"], ppo["output_dir"], ("loss", "policy_loss", "value_loss", "value", "kl", "ratio"))]
    for ref_dir, packed_dir, keys in pairs:
        ref, packed = steps(ref_dir), steps(packed_dir)
        assert [r["step"] for r in packed] == [r["step"] for r in ref][:len(packed)]
        for a, b in zip(ref, packed):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (packed_dir, a["step"], key, a[key], b[key])
    w1 = load_file(os.path.join(runs["one"], "final", "model.safetensors"))
    w2 = load_file(os.path.join(grpo["output_dir"], "final", "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


FLAKY = '''
def flaky(prompts, completions, **_):
    """A verifier that cannot parse completions of even length (raises) and skips those of length 1."""
    for c in completions:
        if len(c) % 2 == 0:
            raise ValueError(f"cannot parse {c!r}")
    return [None if len(c) == 1 else 1.0 for c in completions]


def broken(prompts, completions, **_):
    raise KeyError("answer")
'''


def test_a_reward_function_raising_on_some_completions_is_counted_and_the_run_goes_on(tiny_model_dir, tmp_path):
    (tmp_path / "flaky_rewards.py").write_text(FLAKY)
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    with open(os.path.join(REPO, "data/demo/sft_eval.jsonl")) as f:
        (tmp_path / "eval7.jsonl").write_text("".join(f.readlines()[:7]))
    recipe = rl_recipe(tmp_path, tiny_model_dir, tmp_path / "run", os.path.join(REPO, "ds_configs/zero0.json"),
                       grad_accum=4, max_steps=4, save_every=100)
    recipe["rl"].update(reward_fns=["flaky_rewards:flaky", "toy_rewards:digits"], reward_weights=[1.0, 1.0])
    proc = run_rl(tmp_path, recipe, "flaky.yaml")
    rollouts = [r for r in steps(recipe["output_dir"]) if "reward" in r]
    assert len(rollouts) == 1 and 0 < rollouts[0]["reward_flaky_missing"] < 1, rollouts
    assert rollouts[0]["reward_digits_missing"] == 0.0
    lines = [ln for ln in proc.stderr.splitlines() if "rl: no reward for a completion of" in ln]
    # each names the prompt's row (train rollouts and the greedy eval alike) and the reason
    assert lines and all(re.search(r"(rl_train|eval7)\.jsonl:\d+: flaky: (raised ValueError|returned None|not retried)",
                                   ln) for ln in lines), proc.stderr[-2000:]
    assert len(lines) <= 5 and "Traceback" not in proc.stderr
    evals = [r for r in read_metrics(recipe["output_dir"]) if "eval_reward" in r]
    assert evals and 0 < evals[-1]["eval_reward_flaky_missing"] <= 1
    # a function that never gives a value: one error line, decided on every rank's completions
    recipe["rl"]["reward_fns"] = ["flaky_rewards:broken", "toy_rewards:digits"]
    path = write_recipe(tmp_path / "broken.yaml", {**recipe, "output_dir": str(tmp_path / "broken")})
    proc = run_cmd(python_cmd("launch/rl.py") + ["--recipe", path], timeout=300,
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "broken gave no value for any of the rollout's 8" in errors[0], \
        proc.stderr[-2000:]


def test_zero3_generation_equals_unsharded(tiny_model_dir):
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests/integration/rl_zero3_generate.py"), tiny_model_dir]
    proc = run_cmd(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rl zero3 generate ok") == 2


# --- rl.generation_backend=vllm on CPU: the pure-PyTorch stand-in for the vllm package ---
FAKE_VLLM = os.path.join(REPO, "tests/integration/fake_vllm")


def test_vllm_backend_weight_sync_equals_gathered_zero3_and_merged_lora_and_greedy_equals_hf(tiny_model_dir):
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{FAKE_VLLM}"}
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests/integration/rl_vllm_sync.py"), tiny_model_dir]
    proc = run_cmd(cmd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rl vllm sync ok") == 2


def test_vllm_backend_grpo_run_syncs_once_per_rollout_under_zero3(tiny_model_dir, tmp_path):
    """2 ranks, ZeRO-3, 4 optimizer steps = 2 rollouts x 2 mini-batches, then the final eval: vLLM gets the
    weights 3 times per rank (before each generate, never per step), all of them each time, and what it
    holds at the eval is bitwise the run's final/ model."""
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    with open(os.path.join(REPO, "data/demo/sft_eval.jsonl")) as f:
        (tmp_path / "eval7.jsonl").write_text("".join(f.readlines()[:7]))
    z3 = tmp_path / "zero3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    rec = rl_recipe(tmp_path, tiny_model_dir, tmp_path / "run", str(z3), grad_accum=2, max_steps=4, save_every=0)
    rec["rl"].update(generation_backend="vllm", ppo_epochs=1, mini_batches=2)
    log, dump = tmp_path / "vllm_events.jsonl", tmp_path / "dump"
    dump.mkdir()
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}{os.pathsep}{FAKE_VLLM}", "FAKE_VLLM_LOG": str(log),
           "FAKE_VLLM_DUMP": str(dump)}
    proc = run_rl(tmp_path, rec, "vllm.yaml", ranks=2, env=env)
    assert "keyed sampler's rank/batch invariance and exact resume do not hold" in proc.stdout
    rows = steps(rec["output_dir"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows if "reward" in r] == [1, 3]
    assert all(r["completion_len"] > 0 for r in rows if "reward" in r)
    assert any("eval_reward" in r for r in read_metrics(rec["output_dir"]))
    final = load_file(os.path.join(rec["output_dir"], "final", "model.safetensors"))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    for rank in (0, 1):
        mine = [e for e in events if e["rank"] == rank]
        assert mine[0]["event"] == "init" and mine[0]["sleep"] and mine[0]["backend"] == "external_launcher"
        assert mine[0]["max_model_len"] > rec["rl"]["max_new_tokens"]
        kinds = []
        for e in mine[1:]:  # one load_weights per module: collapsed into one "load"
            k = "load" if e["event"] == "load_weights" else e["event"] + (f":{e['tags'][0]}" if "tags" in e else "")
            if not (k == "load" and kinds[-1:] == ["load"]):
                kinds.append(k)
        one = ["wake_up:weights", "load", "reset_prefix_cache", "wake_up:kv_cache", "generate", "sleep"]
        assert kinds == ["sleep"] + one * 3, kinds  # 2 rollouts + the eval; not once per optimizer step
        names = []  # every parameter pushed at every sync
        for e in mine:
            if e["event"] == "reset_prefix_cache":
                assert sorted(names) == sorted(final), set(names) ^ set(final)
                names = []
            names += e.get("names", []) if e["event"] == "load_weights" else []
        gens = [e for e in mine if e["event"] == "generate"]
        assert [g["greedy"] for g in gens] == [False, False, True]
        assert [g["samples"] for g in gens[:2]] == [4, 4]  # 2 prompts per rank x rl.num_generations 2
        held = load_file(str(dump / f"rank{rank}.safetensors"))  # vLLM's weights at the final eval
        assert set(held) == set(final) and all(torch.equal(held[k], final[k]) for k in final)


@pytest.mark.gpu
def test_vllm_backend_real_engine_on_gpu(tiny_model_dir, tmp_path):
    """The real vllm package on a CUDA GPU: a short GRPO run through it, and the weights vLLM holds after a
    sync equal the engine's for the tensors vLLM keeps under their checkpoint names."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    proc = run_cmd([os.path.join(BIN, "python"), os.path.join(REPO, "tests/integration/rl_vllm_gpu.py"),
                    tiny_model_dir, str(free_port())], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rl vllm gpu ok" in proc.stdout
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    with open(os.path.join(REPO, "data/demo/sft_eval.jsonl")) as f:
        (tmp_path / "eval7.jsonl").write_text("".join(f.readlines()[:7]))
    rec = rl_recipe(tmp_path, tiny_model_dir, tmp_path / "run", os.path.join(REPO, "ds_configs/zero0.json"),
                    grad_accum=4, max_steps=4, save_every=0)
    rec["rl"].update(generation_backend="vllm", ppo_epochs=1, mini_batches=2, vllm_gpu_memory_utilization=0.2)
    run_rl(tmp_path, rec, "vllm_gpu.yaml")
    rows = steps(rec["output_dir"])
    assert [r["step"] for r in rows if "reward" in r] == [1, 3]
