"""LoRA / DoRA / QLoRA: frozen base, adapter-only checkpoints, merged export, ZeRO-3, DPO reference, errors."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import (BIN, REPO, TINY, base_recipe, build_tiny, python_cmd, read_metrics, run_cmd, train_losses, free_port,
                      write_recipe)
from llmtrain.config import ConfigError, load_config

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def lora_recipe(tmp_path, model_dir, lora=None, **train):
    r = base_recipe(tmp_path, model_dir, **train)
    r["lora"] = {**LORA, **(lora or {})}
    return r


def run_sft(recipe, name="r.yaml", launcher=None, timeout=240):
    path = write_recipe(os.path.join(os.path.dirname(recipe["output_dir"]), name), recipe)
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    else:
        cmd = python_cmd("launch/sft.py", "--recipe", path)
    proc = run_cmd(cmd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """1 rank, micro-batch 2 x accumulation 4, LoRA r=4 on every linear layer, merged export, checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("lora")
    recipe = lora_recipe(tmp, tiny_model_dir, lora={"merge": True}, grad_accum=4, save_every=2)
    proc = run_sft(recipe)
    return recipe, proc


def _load_peft(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


# --------------------------------------------------------------------------- single process


def test_only_adapter_weights_train_and_base_stays_bit_identical(lora_run, tiny_model_dir):
    recipe, proc = lora_run
    final = os.path.join(recipe["output_dir"], "final")
    assert os.path.isfile(os.path.join(final, "adapter_config.json"))
    assert "lora: r=4 alpha=8:" in proc.stdout and "trainable of" in proc.stdout
    adapter = load_file(os.path.join(final, "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # only adapter tensors were exported
    assert all(adapter[k].abs().max() > 0 for k in adapter if "lora_B" in k)  # B starts at 0: it trained

    original = {}
    for name in os.listdir(tiny_model_dir):
        if name.endswith(".safetensors"):
            original.update(load_file(os.path.join(tiny_model_dir, name)))
    model = _load_peft(tiny_model_dir, final)
    base_sd = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
               for k, v in model.state_dict().items() if "lora_" not in k}
    compared = 0
    for k, v in original.items():
        if k in base_sd:
            assert torch.equal(base_sd[k], v), k  # bit-identical
            compared += 1
    assert compared == len(original) - ("lm_head.weight" not in base_sd)

    # the checkpoint holds only trainable tensors (+ their optimizer state): far below the model's size
    ckpt = os.path.join(recipe["output_dir"], "checkpoints", "step_00000004")
    states = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False)
    assert states["module"] and all("lora_" in k for k in states["module"])
    assert dir_bytes(ckpt) < 0.5 * dir_bytes(tiny_model_dir)


def test_merged_export_logits_equal_base_plus_adapter(lora_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe, _ = lora_run
    final = os.path.join(recipe["output_dir"], "final")
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(final, "merged"), dtype=torch.float32).eval()
    assert not any("lora" in k for k in merged.state_dict())
    peft_model = _load_peft(tiny_model_dir, final)
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 1e-4  # and the adapter does change the model

    # launch/export.py (base read from adapter_config.json) writes the same weights
    out = tmp_path / "merged"
    proc = run_cmd(python_cmd("launch/export.py", "--adapter", final, "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x, y = load_file(os.path.join(final, "merged", "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_reproduces_uninterrupted_losses(lora_run, tmp_path):
    recipe, _ = lora_run
    out = str(tmp_path / "run")
    shutil.copytree(recipe["output_dir"], out)
    shutil.rmtree(os.path.join(out, "final"))
    shutil.rmtree(os.path.join(out, "checkpoints", "step_00000004"))  # as if killed after step 3
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step_00000002")
    proc = run_sft({**recipe, "output_dir": out})
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout
    assert train_losses(out) == pytest.approx(train_losses(recipe["output_dir"]), rel=1e-6, abs=1e-7)
    a = load_file(os.path.join(recipe["output_dir"], "final", "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _cfg(tmp_path, model_dir, **lora):
    return load_config(write_recipe(tmp_path / "c.yaml", lora_recipe(tmp_path, model_dir, lora=lora)))


def test_gradient_checkpointing_keeps_adapter_gradients(tiny_model_dir, tmp_path):
    """Checkpointed blocks over frozen embeddings need input grads, or the adapters get none."""
    from llmtrain.models.lora import apply_lora
    from transformers import AutoModelForCausalLM

    grads = []
    for ckpt in (False, True):
        cfg = _cfg(tmp_path, tiny_model_dir)
        cfg.model.gradient_checkpointing = ckpt
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_lora(model, cfg.lora, cfg.model, torch.float32)
        with torch.no_grad():  # a non-zero B, so A gets gradients too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        model.train()
        ids = torch.arange(32)[None] + 5
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(n for n in grads[-1]) and all(g is not None for g in grads[-1].values())
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_dora_and_modules_to_save_start_from_the_base_model(tiny_model_dir, tmp_path):
    from llmtrain.models.lora import apply_lora
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_model_dir, use_dora=True, target_modules=["q_proj", "v_proj"],
               modules_to_save=["lm_head"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.arange(16)[None] + 5
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = apply_lora(base, cfg.lora, cfg.model, torch.float32).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert not any("k_proj" in n or "embed_tokens" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- DPO


def test_lora_dpo_reference_is_the_adapter_disabled_policy(tiny_model_dir, tmp_path):
    recipe = lora_recipe(tmp_path, tiny_model_dir, max_steps=2, lr=5e-3)
    recipe["data"] = {"train": [os.path.join(REPO, "data/demo/dpo_train.jsonl")], "max_seq_len": 64,
                      "max_prompt_len": 48, "packing": True}
    recipe["dpo"] = {"beta": 0.1}
    path = write_recipe(tmp_path / "d.yaml", recipe)
    proc = run_cmd(python_cmd("launch/dpo.py", "--recipe", path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dpo: reference = adapters_disabled" in proc.stdout  # no frozen copy, no precomputed table
    rows = [r for r in read_metrics(recipe["output_dir"]) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # step 1 moved the adapters off the reference
    assert os.path.isfile(os.path.join(recipe["output_dir"], "final", "adapter_model.safetensors"))


# --------------------------------------------------------------------------- multi-process


@pytest.mark.multiproc
def test_zero3_two_ranks_match_one_rank_with_accumulation(lora_run, tiny_model_dir, tmp_path):
    ref, _ = lora_run
    # 2 ranks x 2 x 2 = global batch 8; rank 0 merges at the end while rank 1 polls for its marker
    recipe = lora_recipe(tmp_path, tiny_model_dir, lora={"merge": True}, grad_accum=2)
    recipe["deepspeed"]["config"] = os.path.join(REPO, "ds_configs/zero3.json")
    proc = run_sft(recipe, launcher="torchrun", timeout=300)
    assert "2 rank(s)" in proc.stdout and "ZeRO-3" in proc.stdout
    got, want = train_losses(recipe["output_dir"]), train_losses(ref["output_dir"])
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    a = load_file(os.path.join(ref["output_dir"], "final", "adapter_model.safetensors"))
    b = load_file(os.path.join(recipe["output_dir"], "final", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    a = load_file(os.path.join(ref["output_dir"], "final", "merged", "model.safetensors"))
    b = load_file(os.path.join(recipe["output_dir"], "final", "merged", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)


# --------------------------------------------------------------------------- bad input


def test_bad_lora_values_fail_at_load_time(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"lora.r=0 must be >= 1"):
        _cfg(tmp_path, tiny_model_dir, r=0)
    with pytest.raises(ConfigError, match=r"lora.alpha=-1.0 must be > 0"):
        _cfg(tmp_path, tiny_model_dir, alpha=-1)
    with pytest.raises(ConfigError, match=r"lora.target_modules='q_proj' must be \"all-linear\" or a non-empty list"):
        _cfg(tmp_path, tiny_model_dir, target_modules="q_proj")
    with pytest.raises(ConfigError, match=r"lora.qlora=true needs lora.enabled=true"):
        _cfg(tmp_path, tiny_model_dir, enabled=False, qlora=True)
    recipe = lora_recipe(tmp_path, tiny_model_dir)
    recipe["model"] = {"config": dict(TINY["llama"]), "tokenizer": tiny_model_dir}
    with pytest.raises(ConfigError, match=r"lora.enabled=true needs a pretrained base in model.name_or_path"):
        load_config(write_recipe(tmp_path / "c.yaml", recipe))


def test_bad_input_one_line_errors(lora_run, tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", lora_recipe(tmp_path, tiny_model_dir, max_steps=1))
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path, "lora.target_modules=[qq_proj]"), timeout=120)
    assert_one_line_error(proc, "lora.target_modules=['qq_proj'] matches no module", "q_proj", "down_proj")
    if not torch.cuda.is_available():
        proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path, "lora.qlora=true"), timeout=120)
        assert_one_line_error(proc, "lora.qlora=true needs a CUDA GPU")

    # merging into a base whose shapes differ
    model, tok = build_tiny("llama")
    wide = type(model.config).from_dict({**model.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    other = tmp_path / "other-base"
    type(model)(wide).save_pretrained(other)
    tok.save_pretrained(other)
    final = os.path.join(lora_run[0]["output_dir"], "final")
    proc = run_cmd(python_cmd("launch/export.py", "--adapter", final, "--out", str(tmp_path / "m"), "--base", str(other)),
                   timeout=120)
    assert_one_line_error(proc, "does not fit base", "size mismatch")
    from llmtrain.models.lora import merge_into_base

    with pytest.raises(ConfigError, match="holds no adapter_config.json"):
        merge_into_base(str(tmp_path), str(tmp_path / "m"))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_trains_adapters_on_a_4bit_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    recipe = lora_recipe(tmp_path, tiny_model_dir, lora={"qlora": True}, max_steps=3, precision="bf16")
    proc = run_sft(recipe)
    assert "on a 4-bit base" in proc.stdout
    losses = train_losses(recipe["output_dir"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    final = os.path.join(recipe["output_dir"], "final")
    assert all("lora_" in k for k in load_file(os.path.join(final, "adapter_model.safetensors")))
    # the adapter merges into the bf16 base
    out = tmp_path / "merged"
    merged = run_cmd(python_cmd("launch/export.py", "--adapter", final, "--out", str(out)), timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]


# --------------------------------------------------------------------------- merge: revision, remote code


def _adapter_on(base_model, out_dir: str, base_name: str, revision=None) -> str:
    """A LoRA adapter with non-zero B matrices (as after training), saved for `base_name`."""
    import json

    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(base_model, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", revision=revision))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    data = json.load(open(cfg_path))
    data["base_model_name_or_path"] = base_name  # as a run on model.name_or_path=base_name writes it
    json.dump(data, open(cfg_path, "w"))
    return out_dir


def _merged_by_hand(base_model, adapter_dir: str) -> dict:
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload().state_dict()


def _fake_hub(cache: str, repo: str, revisions: dict) -> None:
    """A Hugging Face hub cache holding `repo` at several revisions (ref name -> model), read offline."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"))
    for i, (ref, (model, tok)) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        model.save_pretrained(os.path.join(folder, "snapshots", commit))
        tok.save_pretrained(os.path.join(folder, "snapshots", commit))
        with open(os.path.join(folder, "refs", ref), "w") as f:
            f.write(commit)


def test_merge_loads_the_base_revision_the_adapter_was_trained_on(tmp_path):
    from llmtrain.config import Config
    from llmtrain.models.lora import peft_config

    cfg = Config()
    cfg.model.revision = "v2"
    assert peft_config(cfg.lora, cfg.model.revision).revision == "v2"  # a run records model.revision in adapter_config.json

    main, v2 = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    _fake_hub(str(tmp_path / "hub"), "llmtrain/tiny", {"main": main, "v2": v2})
    adapter = _adapter_on(build_tiny("llama", seed=1)[0], str(tmp_path / "adapter"), "llmtrain/tiny", revision="v2")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for extra, base in (([], v2), (["--revision", "main"], main)):
        out = tmp_path / f"merged{len(extra)}"
        proc = run_cmd(python_cmd("launch/export.py", "--adapter", adapter, "--out", str(out), *extra), timeout=120, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        merged = load_file(str(out / "model.safetensors"))
        expected = _merged_by_hand(build_tiny("llama", seed=0 if base is main else 1)[0], adapter)
        for k, v in merged.items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=(extra, k))


_CUSTOM_CONFIG = '''from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "llmtrain_tiny"
'''
_CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_llmtrain_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def _remote_code_model(path: str):
    """A local model directory whose architecture ships as code beside it (auto_map), as many hub models do."""
    import json

    model, tok = build_tiny("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "configuration_llmtrain_tiny.py"), "w") as f:
        f.write(_CUSTOM_CONFIG)
    with open(os.path.join(path, "modeling_llmtrain_tiny.py"), "w") as f:
        f.write(_CUSTOM_MODEL)
    data = json.load(open(os.path.join(path, "config.json")))
    data.update(model_type="llmtrain_tiny", architectures=["TinyForCausalLM"],
                auto_map={"AutoConfig": "configuration_llmtrain_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_llmtrain_tiny.TinyForCausalLM"})
    json.dump(data, open(os.path.join(path, "config.json"), "w"))
    return model


def test_merge_runs_a_bases_own_code_only_with_trust_remote_code(tmp_path):
    base_dir = str(tmp_path / "custom")
    plain = _remote_code_model(base_dir)
    adapter = _adapter_on(build_tiny("llama")[0], str(tmp_path / "adapter"), base_dir)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "merged"
    proc = run_cmd(python_cmd("launch/export.py", "--adapter", adapter, "--out", str(out)), timeout=120, env=env)
    assert_one_line_error(proc, "--base", "ships its own model code", "--trust-remote-code")
    proc = run_cmd(python_cmd("launch/export.py", "--adapter", adapter, "--out", str(out), "--trust-remote-code"),
                   timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    merged, expected = load_file(str(out / "model.safetensors")), _merged_by_hand(plain, adapter)
    for k, v in merged.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=k)


def test_lora_run_merges_a_remote_code_base_with_its_trust_remote_code(tmp_path):
    base_dir = str(tmp_path / "custom")
    _remote_code_model(base_dir)
    recipe = lora_recipe(tmp_path, base_dir, lora={"merge": True}, max_steps=1)
    recipe["model"]["trust_remote_code"] = True
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path), timeout=240,
                   env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = os.path.join(recipe["output_dir"], "final", "merged")
    assert os.path.isfile(os.path.join(merged, "model.safetensors"))
    assert json_load(os.path.join(merged, "config.json"))["model_type"] == "llmtrain_tiny"


def json_load(path: str):
    import json

    with open(path) as f:
        return json.load(f)
