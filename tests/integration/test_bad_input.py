"""User mistakes end as one line naming the key/file and the fix: exit 2, no traceback."""
from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, base_recipe, have, python_cmd, run_cmd, write_recipe
from llmtrain.config import ConfigError, load_config


def run_sft(recipe_path: str, *overrides: str):
    return run_cmd(python_cmd("launch/sft.py", "--recipe", recipe_path, *overrides), timeout=180)


def assert_one_line_error(proc, *needles: str):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    return base_recipe(tmp_path, tiny_model_dir, max_steps=1)


def test_unknown_key_suggests_the_nearest(tmp_path, recipe):
    recipe["train"]["max_step"] = 3
    proc = run_sft(write_recipe(tmp_path / "r.yaml", recipe))
    assert_one_line_error(proc, "r.yaml:", "unknown key train.max_step; did you mean train.max_steps?")


def test_unknown_override_and_wrong_type(tmp_path, recipe):
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_one_line_error(run_sft(path, "train.lrr=1"), "unknown key train.lrr; did you mean train.lr?")
    with pytest.raises(ConfigError, match="train.micro_batch_size='two' must be an integer"):
        load_config(path, ["train.micro_batch_size=two"])
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: train.grad_accum=0 must be >= 1"):
        recipe["train"]["grad_accum"] = 0
        load_config(write_recipe(tmp_path / "r.yaml", recipe))


def test_missing_files(tmp_path, recipe):
    assert_one_line_error(run_sft(str(tmp_path / "nope.yaml")), "recipe", "nope.yaml not found")
    recipe["data"]["train"] = [str(tmp_path / "missing.jsonl")]
    proc = run_sft(write_recipe(tmp_path / "r.yaml", recipe))
    assert_one_line_error(proc, "data.train", "missing.jsonl", "not found")
    recipe["data"]["train"] = [os.path.join(REPO, "data/demo/sft_train.jsonl")]
    recipe["model"]["name_or_path"] = str(tmp_path / "no-such-model")
    assert_one_line_error(run_sft(write_recipe(tmp_path / "r.yaml", recipe)), "model.name_or_path", "not found")


def test_batch_size_in_both_recipe_and_deepspeed_json_is_a_conflict(tmp_path, recipe):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    recipe["deepspeed"]["config"] = str(ds)
    proc = run_sft(write_recipe(tmp_path / "r.yaml", recipe))
    assert_one_line_error(proc, "ds.json", "train_micro_batch_size_per_gpu=4", "train.micro_batch_size=2")


def test_too_many_bad_rows_abort_with_a_report(tmp_path, recipe):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]})
    data.write_text("\n".join([good] * 8 + ["{oops", json.dumps({"messages": [{"role": "robot", "content": "x"}]})]))
    recipe["data"]["train"] = [str(data)]
    proc = run_sft(write_recipe(tmp_path / "r.yaml", recipe))
    assert_one_line_error(proc, "skipped 2 of 10 rows", f"{data}:9", "max_bad_fraction")
    # tolerated below the threshold: the run trains and the skipped rows are listed with file:line
    proc = run_sft(write_recipe(tmp_path / "r.yaml", recipe), "data.max_bad_fraction=0.25")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(recipe["output_dir"], "bad_rows_train.jsonl")) as f:
        assert [json.loads(l)["origin"] for l in f] == [f"{data}:9", f"{data}:10"]


def test_existing_run_is_never_overwritten_silently(tmp_path, recipe):
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_sft(path).returncode == 0
    proc = run_sft(path, "train.resume=never")
    assert_one_line_error(proc, "already holds a run", "overwrite_output_dir=true")
    proc = run_sft(path, f"train.resume={tmp_path}/nowhere")
    assert_one_line_error(proc, "train.resume", "not found")
    proc = run_sft(path)  # auto: the run already reached max_steps
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    with pytest.raises(ConfigError, match="must not climb out"):
        load_config(path, ["output_dir=../../etc"])


@pytest.mark.multiproc
def test_a_config_error_under_mpirun_is_printed_once(tmp_path, recipe):
    """mpirun sets OMPI_COMM_WORLD_RANK, not RANK, and the error comes before torch.distributed
    starts: only the launcher's rank 0 prints it (mpirun forwards every rank's stderr)."""
    if not have("mpirun"):
        pytest.skip("OpenMPI (mpirun) is not installed; scripts/setup.sh installs it as root")
    recipe["train"]["max_step"] = 3
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cmd(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x", "PATH",
                    *python_cmd("launch/sft.py", "--recipe", path)], timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {path}:{_line_of(path, 'max_step')}: unknown key train.max_step; did you mean train.max_steps?"]


def _line_of(path: str, key: str) -> int:
    with open(path) as f:
        return next(i for i, line in enumerate(f, 1) if line.strip().startswith(f"{key}:"))
