"""Precision: fp16 where it cannot work is one line, fp16 overflows lower the loss scale and the
run goes on, the JSON's bf16/fp16 settings are merged (not dropped), bf16 gradients are summed
in fp32 under ZeRO-2/3 when accumulating."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO, base_recipe, free_port, python_cmd, read_metrics, run_cmd, train_losses, write_recipe
from llmtrain.config import ConfigError, load_config
from llmtrain.train import ds_config

TIMEOUT = 300
CUDA = torch.device("cuda")  # build_ds_config only reads device.type: no GPU needed


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def ds_json(tmp_path, data: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def build_ds_config(cfg, world_size, device) -> dict:
    return ds_config.build_ds_config(cfg.train, cfg.deepspeed, world_size, device)


def config(tmp_path, model_dir, ds: dict, *overrides: str):
    recipe = base_recipe(tmp_path, model_dir)
    recipe["deepspeed"]["config"] = ds_json(tmp_path, ds)
    return load_config(write_recipe(tmp_path / "r.yaml", recipe), list(overrides))


def test_fp16_on_a_cpu_without_fp16_is_one_line(tmp_path, tiny_model_dir):
    """A CPU whose DeepSpeed accelerator reports no fp16 gets the precision line; one that has fp16
    (e.g. Sapphire Rapids: AVX512-FP16/AMX) passes that check and meets the next one, the ZeRO-0 refusal."""
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path, tiny_model_dir, max_steps=1))
    error = one_line_error(run_cmd(python_cmd("launch/sft.py", "--recipe", path, "train.precision=fp16"), timeout=TIMEOUT))
    if ds_config._accelerator_supports_fp16():
        assert "is not supported on this cpu device" not in error and "fp16 under ZeRO-0" in error, error
    else:
        assert "train.precision=fp16 is not supported on this cpu device" in error and "bf16 or fp32" in error


def test_fp16_under_zero0_is_refused_because_deepspeed_skips_its_loss_scale(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, {"zero_optimization": {"stage": 0}}, "train.precision=fp16")
    with pytest.raises(ConfigError, match="fp16 under ZeRO-0 does not train correctly.*zero1.json"):
        build_ds_config(cfg, 1, CUDA)
    cfg = config(tmp_path, tiny_model_dir, {"zero_optimization": {"stage": 1}}, "train.precision=fp16")
    assert build_ds_config(cfg, 1, CUDA)["fp16"]["enabled"] is True


def test_deepspeed_zero0_fp16_backward_still_lacks_the_loss_scale():
    """The reason for the refusal above, pinned: when a DeepSpeed upgrade makes engine.backward
    scale the loss under ZeRO-0 (deepspeedai/DeepSpeed#8393), this fails: lift the refusal then."""
    proc = run_cmd(python_cmd("tests/scripts/ds_zero0_fp16_probe.py"), timeout=120, env={"MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "optimizer=FP16_UnfusedOptimizer grad=1.0" in proc.stdout  # 1024.0 once the scale is applied


def test_fp16_overflows_lower_the_loss_scale_and_training_goes_on(tmp_path, tiny_model_dir):
    """ZeRO-1 fp16 on CPU fp16 tensors (only DeepSpeed's device probe replaced): an initial scale of
    2^20 overflows the tiny model's fp16 gradients; each overflow skips the update (and the LR
    step) and halves the scale, until the scaled gradients fit, then the run trains normally."""
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=8, warmup_steps=2, schedule="constant", max_skipped_steps=6)
    recipe["deepspeed"]["config"] = ds_json(tmp_path, {"zero_optimization": {"stage": 1},
                                                       "fp16": {"initial_scale_power": 20, "hysteresis": 1}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cmd(python_cmd("tests/scripts/fp16_on_cpu.py", "sft", "--recipe", path, "train.precision=fp16"),
                   timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(recipe["output_dir"])
    skipped = {r["step"] for r in rows if r.get("skipped")}
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)) and 1 <= len(skipped) <= 5, skipped
    # replay by hand: an overflow halves the scale and leaves the LR schedule where it was
    # (constant after 2 warmup steps: 0.5, then 1 x lr); a clean step advances the schedule
    scale, applied = 2.0 ** 20, 0
    for r in steps:
        assert r["lr"] == pytest.approx(1e-3 * (0.5 if applied == 0 else 1.0), rel=1e-6), r
        if r["step"] in skipped:
            scale /= 2
        else:
            applied += 1
            assert r["grad_norm"] < 100  # the unscaled norm
        assert r["loss_scale"] == scale, r
    trained = [r["loss"] for r in steps if r["step"] not in skipped]
    assert trained[-1] < trained[0] - 0.05  # and it learns


def test_json_precision_blocks_are_merged_and_only_enabled_can_conflict(tmp_path, tiny_model_dir):
    ds = {"zero_optimization": {"stage": 2},
          "fp16": {"loss_scale_window": 500, "initial_scale_power": 12, "hysteresis": 4, "min_loss_scale": 0.5},
          "bf16": {"immediate_grad_update": True}}
    built = build_ds_config(config(tmp_path, tiny_model_dir, ds, "train.precision=fp16"), 1, CUDA)
    assert built["fp16"] == {"loss_scale_window": 500, "initial_scale_power": 12, "hysteresis": 4,
                             "min_loss_scale": 0.5, "enabled": True, "loss_scale": 0}
    assert built["bf16"] == {"immediate_grad_update": True, "enabled": False}
    built = build_ds_config(config(tmp_path, tiny_model_dir, ds, "train.precision=bf16"), 1, CUDA)
    assert built["bf16"] == {"immediate_grad_update": True, "enabled": True}
    assert built["fp16"]["enabled"] is False and built["fp16"]["loss_scale_window"] == 500
    # without the JSON's choices: DeepSpeed's dynamic scaling from 2^16
    built = build_ds_config(config(tmp_path, tiny_model_dir, {"zero_optimization": {"stage": 2}}, "train.precision=fp16"), 1, CUDA)
    assert built["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    # a real conflict: the JSON enables fp16, the recipe says bf16
    with pytest.raises(ConfigError, match="fp16.enabled=True disagrees with train.precision=bf16"):
        build_ds_config(config(tmp_path, tiny_model_dir, {**ds, "fp16": {"enabled": True}}, "train.precision=bf16"), 1, CUDA)


@pytest.mark.parametrize("stage,grad_accum,expected", [(0, 2, None), (1, 2, None), (2, 2, "fp32"), (3, 2, "fp32"),
                                                       (3, 1, None)])
def test_bf16_grad_accumulation_defaults_to_fp32_under_zero2_and_3(tmp_path, tiny_model_dir, stage, grad_accum, expected):
    cfg = config(tmp_path, tiny_model_dir, {"zero_optimization": {"stage": stage}}, "train.precision=bf16",
                 f"train.grad_accum={grad_accum}")
    assert build_ds_config(cfg, 1, CUDA).get("data_types", {}).get("grad_accum_dtype") == expected


def test_bf16_grad_accumulation_dtype_from_the_json_is_kept_or_refused_on_zero0(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, {"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}},
                 "train.precision=bf16")
    assert build_ds_config(cfg, 1, CUDA)["data_types"] == {"grad_accum_dtype": "bf16"}
    cfg = config(tmp_path, tiny_model_dir, {"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}},
                 "train.precision=bf16")
    with pytest.raises(ConfigError, match="not supported by DeepSpeed under ZeRO-0"):
        build_ds_config(cfg, 1, CUDA)


def test_bf16_zero2_run_accumulates_in_fp32_and_tracks_the_fp32_losses(tmp_path, tiny_model_dir):
    out = {}
    for precision in ("fp32", "bf16"):
        recipe = base_recipe(tmp_path / precision, tiny_model_dir, precision=precision)
        recipe["deepspeed"]["config"] = os.path.join(REPO, "ds_configs/zero2.json")
        os.makedirs(tmp_path / precision)
        proc = run_cmd(python_cmd("launch/sft.py", "--recipe", write_recipe(tmp_path / precision / "r.yaml", recipe)),
                       timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[precision] = (proc.stdout, train_losses(recipe["output_dir"]))
    assert "ZeRO-2, bf16 (gradients accumulated in fp32)," in out["bf16"][0]
    assert len(out["bf16"][1]) == 4
    assert out["bf16"][1] == pytest.approx(out["fp32"][1], rel=2e-2)  # bf16 rounding, same training
