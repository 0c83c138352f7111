"""Config: every recipe loads, every key is documented, overrides are typed, errors name file:line."""
from __future__ import annotations

import glob
import os
import re

import pytest

from conftest import REPO
from llmtrain.config import ConfigError, load_config, parse_override
from llmtrain.config.loading import _KEYS
from llmtrain.train.optim import lr_multiplier


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.train.max_steps >= 1
    with open(recipe) as f:
        head = f.read().split("\n", 1)[0]
    assert head.startswith("#"), "every recipe starts with a header comment"


def test_every_config_key_is_documented_in_the_readme():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    documented = set(re.findall(r"^\| `([a-z_0-9.]+)`", readme, flags=re.M))
    # rows like `train.adam_beta1` / `adam_beta2` document siblings in one line
    for line in re.findall(r"^\| (`[a-z_0-9.]+`(?: / `[a-z_0-9]+`)+)", readme, flags=re.M):
        names = re.findall(r"`([a-z_0-9.]+)`", line)
        prefix = names[0].rsplit(".", 1)[0]
        documented |= {names[0]} | {f"{prefix}.{n}" for n in names[1:]}
    missing = sorted(k for k in _KEYS if k not in documented)
    assert not missing, f"README config reference lacks: {missing}"


def test_overrides_are_parsed_as_yaml_and_typed():
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override("data.train=[a.jsonl, b.jsonl]") == ("data.train", ["a.jsonl", "b.jsonl"])
    assert parse_override("data.packing=true") == ("data.packing", True)
    cfg = load_config(None, ["model.name_or_path=m", "data.train=x.jsonl", "train.lr=1e-4", "train.max_steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 7 and cfg.data.train == ["x.jsonl"]
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("train.lr")


def test_yaml_errors_and_value_errors_name_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name_or_path: m\ndata:\n  train: [x]\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"r.yaml:6: train.lr=-1.0 must be > 0"):
        load_config(str(p))
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: invalid YAML"):
        load_config(str(p))
    p.write_text("model:\n  name_or_path: m\n  config: {model_type: llama}\ndata:\n  train: [x]\n")
    with pytest.raises(ConfigError, match="exactly one of model.name_or_path"):
        load_config(str(p))
    p.write_text("model:\n  name_or_path: m\ndata:\n  train: [x]\n  packing: maybe\n")
    with pytest.raises(ConfigError, match=r"r.yaml:5: data.packing='maybe' must be true or false"):
        load_config(str(p))


def test_lr_schedule_matches_hand_values():
    kw = dict(max_steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(1, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(2, schedule="cosine", **kw) == pytest.approx(1.0)  # peak right after warmup
    assert lr_multiplier(10, schedule="cosine", **kw) == pytest.approx(0.1)  # min at the last step
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.5)))
    assert lr_multiplier(6, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(9, schedule="constant", **kw) == 1.0


def test_a_recipe_that_starts_from_another_runs_output_names_the_command_that_makes_it(tmp_path, monkeypatch):
    from llmtrain.config import check_produced_inputs

    monkeypatch.chdir(tmp_path)  # the debug recipes' paths are relative: nothing of them exists here
    recipe = os.path.join(REPO, "recipes/debug/dpo.yaml")
    cfg = load_config(recipe)  # loading alone never needs the inputs
    with pytest.raises(ConfigError) as e:
        check_produced_inputs(cfg)
    assert str(e.value).startswith(f"{recipe}:") and "\n" not in str(e.value)
    assert "runs/debug-sft/final does not exist yet" in str(e.value)
    assert "`python launch/sft.py --recipe recipes/debug/sft.yaml`" in str(e.value)
    os.makedirs("runs/debug-sft/final")  # the SFT ran: now the pairs are what is missing, and their command is named
    with pytest.raises(ConfigError, match=r"onpolicy_pairs.jsonl does not exist yet; it is made by `python "
                                          r"examples/make_dpo_pairs.py --model runs/debug-sft/final"):
        check_produced_inputs(cfg)
    open("runs/debug-sft/onpolicy_pairs.jsonl", "w").close()
    check_produced_inputs(cfg)
    # an input the recipe no longer uses (overridden) is not required
    other = load_config(recipe, ["model.name_or_path=elsewhere", "data.train=[elsewhere.jsonl]"])
    os.rmdir("runs/debug-sft/final")
    check_produced_inputs(other)


def test_every_debug_recipe_that_starts_from_a_run_says_which():
    """Each debug recipe whose model is another debug recipe's output_dir/final lists it in produced_by."""
    outputs = {load_config(p).output_dir: p for p in glob.glob(os.path.join(REPO, "recipes/debug/*.yaml"))}
    for path in glob.glob(os.path.join(REPO, "recipes/debug/*.yaml")):
        cfg = load_config(path)
        start = cfg.model.name_or_path
        if start and os.path.dirname(start) in outputs:
            producer = os.path.relpath(outputs[os.path.dirname(start)], REPO)
            assert producer in cfg.produced_by.get(start, ""), (path, start, producer)


def test_ppo_settings_fail_with_one_line_naming_the_key():
    grpo = os.path.join(REPO, "recipes/debug/grpo.yaml")
    with pytest.raises(ConfigError, match=r"rl.critic: rl.advantage=gae \(PPO\) needs a critic"):
        load_config(grpo, ["rl.advantage=gae"])
    with pytest.raises(ConfigError, match=r"rl.lam=1.5 must be in \[0, 1\]"):
        load_config(grpo, ["rl.advantage=gae", "rl.critic=somewhere", "rl.lam=1.5"])
    with pytest.raises(ConfigError, match=r"rl.critic_lr=0.0 must be > 0"):
        load_config(grpo, ["rl.advantage=gae", "rl.reward_model=somewhere", "rl.critic_lr=0.0"])
    assert load_config(grpo, ["rl.advantage=gae", "rl.reward_model=rm"]).rl.critic is None  # the reward model serves
