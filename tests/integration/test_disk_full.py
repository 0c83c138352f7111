"""A full disk during a checkpoint or the final/ export: one `error:` line and exit status 5, the partial
write removed, the last complete checkpoint (and `latest`) and a previous final/ intact, and a check
before each save that stops the run before writing when the previous checkpoint would not fit.

Real runs of launch/sft.py on a 16 MiB tmpfs mounted by the test (needs root). The disk fills up at a
chosen moment through the LLMTRAIN_FAULT_FILL_DISK hook, which allocates a ballast file on the same
filesystem as another job on a shared disk would (the checkpoint itself is ~3 MiB)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from conftest import BIN, REPO, base_recipe, free_port, python_cmd, run_cmd, write_recipe
from llmtrain.train import export

EXIT_STORAGE = 5


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: run the tests as root to cover the full-disk paths")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    yield str(mnt)
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def launch(ranks: int, recipe_path: str, *overrides: str, fill: str | None = None, fill_rank: int = 0):
    env = {"LLMTRAIN_FAULT_FILL_DISK": fill, "LLMTRAIN_FAULT_RANK": str(fill_rank)} if fill else {}
    if ranks == 1:
        cmd = python_cmd("launch/sft.py", "--recipe", recipe_path, *overrides)
    else:  # the deepspeed launcher passes a rank's exit status on (torchrun always exits 1)
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               os.path.join(REPO, "launch/sft.py"), "--recipe", recipe_path, *overrides]
    return run_cmd(cmd, timeout=300, env=env)


def storage_error(proc) -> str:
    assert proc.returncode == EXIT_STORAGE, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def digest(folder: str) -> dict:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


def setup_run(tmp_path, tiny_model_dir, disk: str) -> tuple[str, str]:
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=4, save_every=2, keep_last=5)
    recipe["output_dir"] = os.path.join(disk, "run")
    return write_recipe(tmp_path / "r.yaml", recipe), recipe["output_dir"]


def assert_only_step_2(out: str) -> None:
    ck = os.path.join(out, "checkpoints")
    assert sorted(n for n in os.listdir(ck) if n.startswith("step_")) == ["step_00000002"]  # partial removed
    assert open(os.path.join(ck, "latest")).read() == "step_00000002"
    assert os.path.isfile(os.path.join(ck, "step_00000002", "COMPLETE"))


def test_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint_and_final(tiny_model_dir, tmp_path, small_disk):
    path, out = setup_run(tmp_path, tiny_model_dir, small_disk)
    ck, final = os.path.join(out, "checkpoints"), os.path.join(out, "final")
    shutil.copytree(tiny_model_dir, final)  # an earlier export the failed one must not destroy
    before = digest(final)
    # the disk fills up while the step-4 checkpoint is written
    line = storage_error(launch(1, path, fill="step_00000004"))
    assert f"checkpoint {ck}/step_00000004 could not be written" in line and "MiB free" in line, line
    assert f"last complete checkpoint: {ck}/step_00000002 (`latest` points at it)" in line, line
    assert_only_step_2(out)
    # still full: the space check stops the next attempt before it writes anything
    line = storage_error(launch(1, path))
    assert "step_00000004 not written" in line and "the previous checkpoint took" in line, line
    assert_only_step_2(out)
    # space freed; now the final/ export hits a full disk: the previous final/ stays byte for byte
    os.remove(os.path.join(ck, ".fault_ballast"))
    line = storage_error(launch(1, path, fill="final"))
    assert f"writing {final} failed" in line and f"the previous {final} (step ?) is untouched" in line, line
    assert digest(final) == before and not os.path.exists(final + ".tmp")
    assert os.path.isfile(os.path.join(ck, "step_00000004", "COMPLETE"))
    # space freed: the rerun exports the trained step-4 state without training again
    os.remove(os.path.join(out, ".fault_ballast"))
    proc = launch(1, path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained 0 steps" in proc.stdout and export.exported_step(final) == 4


@pytest.mark.multiproc
def test_full_disk_on_one_rank_of_two_fails_every_rank_with_one_line(tiny_model_dir, tmp_path, small_disk):
    """Rank 1 fills the disk as the step-4 checkpoint starts: no rank is left in a barrier, every rank exits 5."""
    path, out = setup_run(tmp_path, tiny_model_dir, small_disk)
    line = storage_error(launch(2, path, fill="step_00000004", fill_rank=1))
    assert "step_00000004 could not be written" in line and "step_00000002 (`latest` points at it)" in line, line
    assert_only_step_2(out)
