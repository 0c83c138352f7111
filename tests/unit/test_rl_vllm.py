"""rl.generation_backend=vllm, the parts that need no engine: load-time errors (one line naming the fix),
vLLM outputs -> the hf backend's (token ids, truncated) form, the default max_model_len."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from llmtrain.config import ConfigError, load_config
from llmtrain.config.schema import RLConfig
from llmtrain.objectives.rl import RL
from llmtrain.objectives.rl.vllm_backend import completions, max_model_len

FAKE_VLLM = os.path.join(REPO, "tests/integration/fake_vllm")
GRPO = os.path.join(REPO, "recipes/debug/grpo.yaml")


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.syspath_prepend(FAKE_VLLM)
    sys.modules.pop("vllm", None)
    yield
    sys.modules.pop("vllm", None)  # later tests in this process must not see the stand-in


def test_missing_vllm_is_one_config_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as when it is not installed
    cfg = load_config(GRPO, ["rl.generation_backend=vllm"])
    with pytest.raises(ConfigError, match=r"rl.generation_backend=vllm needs the vllm package.*pip install vllm"):
        RL.from_config(cfg)
    assert isinstance(RL.from_config(load_config(GRPO)), RL)  # the hf backend never imports vllm


def test_vllm_backend_refuses_what_it_cannot_load_or_merge(fake_vllm):
    assert isinstance(RL.from_config(load_config(GRPO, ["rl.generation_backend=vllm"])), RL)
    for extra, match in ((["lora.enabled=true", "lora.use_dora=true"], "use_dora=true is not supported"),
                         (["lora.enabled=true", "lora.qlora=true"], "qlora=true is not supported")):
        with pytest.raises(ConfigError, match=match):
            RL.from_config(load_config(GRPO, ["rl.generation_backend=vllm"] + extra))
    cfg = load_config(GRPO, ["rl.generation_backend=vllm"])
    cfg.model.name_or_path, cfg.model.config = None, {"model_type": "llama"}
    with pytest.raises(ConfigError, match="builds its engine from model.name_or_path"):
        RL.from_config(cfg)
    with pytest.raises(ConfigError, match="rl.vllm_gpu_memory_utilization"):
        load_config(GRPO, ["rl.vllm_gpu_memory_utilization=1.5"])


def out(index, ids, finish, stop_reason=None):
    return SimpleNamespace(index=index, token_ids=ids, finish_reason=finish, stop_reason=stop_reason)


def test_vllm_outputs_convert_to_generate_form_in_sample_order():
    stops = [2, 9]
    req = SimpleNamespace(outputs=[out(1, [5, 6, 7], "length"),  # listed out of order: sorted by index
                                   out(0, [5, 9], "stop", 9),  # stop kept in token_ids
                                   out(2, [4, 4], "stop", 2)])  # stop only in stop_reason: put back (it is trained)
    assert completions(req, stops) == [([5, 9], False), ([5, 6, 7], True), ([4, 4, 2], False)]


def test_default_max_model_len_is_longest_prompt_plus_budget():
    r = RLConfig(max_new_tokens=7)
    data = SimpleNamespace(prompts=SimpleNamespace(max_len=lambda: 12),  # a PromptSet's longest prompt
                           eval_prompts=SimpleNamespace(max_len=lambda: 20))
    assert max_model_len(r, data) == 27
    assert max_model_len(r, SimpleNamespace(prompts=data.prompts, eval_prompts=None)) == 19
    assert max_model_len(RLConfig(vllm_max_model_len=4096), data) == 4096
