"""Runs that survive: non-finite steps skipped together, atomic checkpoints, resume guards, no secrets on disk."""
from __future__ import annotations

import contextlib
import glob
import os

import pytest
import torch

from conftest import BIN, REPO, base_recipe, python_cmd, read_metrics, run_cmd, write_recipe, free_port
from llmtrain.train import checkpoint
from llmtrain.config import load_config, redact


def module_weights(ckpt_dir: str) -> dict:
    # DeepSpeed's own (pickle) file, written by this test's run: fine to load here
    path = glob.glob(os.path.join(ckpt_dir, "*model_states.pt"))[0]
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 2])
def test_nan_on_one_rank_skips_the_update_on_every_rank(tiny_model_dir, tmp_path, stage):
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=3, grad_accum=1, save_every=1, keep_last=5)
    recipe["deepspeed"]["config"] = os.path.join(REPO, f"ds_configs/zero{stage}.json")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    proc = run_cmd(cmd, timeout=240, env={"LLMTRAIN_FAULT_NAN_STEP": "2", "LLMTRAIN_FAULT_RANK": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(recipe["output_dir"])
    assert [r["step"] for r in rows if r.get("skipped")] == [2]
    ck = os.path.join(recipe["output_dir"], "checkpoints")
    w1, w2, w3 = (module_weights(os.path.join(ck, f"step_0000000{i}")) for i in (1, 2, 3))
    for k in w1:  # step 2 applied nothing (on either rank: the checkpoint holds the shared weights) ...
        assert torch.equal(w1[k], w2[k]), k
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # ... and training went on at step 3
    assert all(torch.isfinite(v).all() for v in w3.values())


def test_consecutive_non_finite_steps_abort_with_one_line(tiny_model_dir, tmp_path):
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=5, max_skipped_steps=2)
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", write_recipe(tmp_path / "r.yaml", recipe)), timeout=180,
                   env={"LLMTRAIN_FAULT_NAN_STEP": "2,3"})
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "2 consecutive steps had non-finite losses" in proc.stderr
    assert [r["step"] for r in read_metrics(recipe["output_dir"]) if r.get("skipped")] == [2, 3]


def _fake_checkpoint(root, step, complete=True):
    path = os.path.join(root, checkpoint.tag_for(step))
    os.makedirs(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write("{}")
    if complete:
        open(os.path.join(path, checkpoint.COMPLETE), "w").close()
    return path


def test_resume_auto_ignores_incomplete_checkpoints_and_retention_keeps_the_newest(tmp_path):
    cfg = load_config(None, ["model.name_or_path=x", "data.train=[x]", f"output_dir={tmp_path}"])
    root = checkpoint.ckpt_root(cfg)
    for s in (2, 4):
        _fake_checkpoint(root, s)
    _fake_checkpoint(root, 6, complete=False)  # killed while writing
    assert checkpoint.find_resume(cfg).endswith("step_00000004")
    checkpoint.prune(root, keep_last=1)
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006"]  # newest complete kept, newer partial left
    _fake_checkpoint(root, 8)
    checkpoint.prune(root, keep_last=1)
    assert sorted(os.listdir(root)) == ["step_00000008"]  # the stale partial goes once a newer complete exists
    with pytest.raises(Exception, match="incomplete"):
        bad = _fake_checkpoint(root, 9, complete=False)
        checkpoint.find_resume(load_config(None, ["model.name_or_path=x", "data.train=[x]", f"train.resume={bad}"]))


def test_a_failed_delete_warns_and_does_not_stop(tmp_path, capsys, monkeypatch):
    root = str(tmp_path)
    for s in (1, 2, 3):
        _fake_checkpoint(root, s)
    import shutil

    def boom(path, *a, **k):
        raise OSError("read-only file system")

    monkeypatch.setattr(shutil, "rmtree", boom)
    checkpoint.prune(root, keep_last=1)  # no exception
    assert "could not delete old checkpoint" in capsys.readouterr().err


def test_resume_with_different_data_is_refused_unless_forced(tiny_model_dir, tmp_path):
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=2)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_cmd(python_cmd("launch/sft.py", "--recipe", path), timeout=180).returncode == 0
    other = os.path.join(REPO, "data/demo/sft_eval.jsonl")
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path, "train.max_steps=3", f"data.train=[{other}]"), timeout=180)
    assert proc.returncode == 2 and "the training data changed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", path, "train.max_steps=3", f"data.train=[{other}]",
                              "train.resume_force=true"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming anyway" in proc.stdout


def test_secrets_never_reach_the_output_dir(tiny_model_dir, tmp_path):
    assert redact({"wandb": {"api_key": "s3cret", "mode": "x"}, "hf_token": "t0k"}) == \
        {"wandb": {"api_key": "<redacted>", "mode": "x"}, "hf_token": "<redacted>"}
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=1)
    recipe["logging"]["wandb"] = {"mode": "offline"}
    secret = "wandb-secret-0123456789abcdef"
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", write_recipe(tmp_path / "r.yaml", recipe)), timeout=180,
                   env={"WANDB_API_KEY": secret, "HF_TOKEN": "hf_" + secret, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr
    for f in glob.glob(os.path.join(recipe["output_dir"], "**", "*"), recursive=True):
        if os.path.isfile(f) and os.path.getsize(f) < 50_000_000:
            with open(f, "rb") as fh:
                assert secret.encode() not in fh.read(), f


def _pids_running(marker: str) -> list[int]:
    """Live processes whose command line mentions marker (read from /proc: no psutil needed)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                pids.append(int(d))
    return pids


def _is_rank(pid: int) -> bool:
    """A rank has RANK in its environment; the launchers above it do not."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(v.startswith(b"RANK=") for v in f.read().split(b"\0"))
    except OSError:  # gone meanwhile
        return False


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_ranks_die_with_a_sigkilled_launcher(tiny_model_dir, tmp_path, launcher):
    """kill -9 of the launcher alone (not its process group): its ranks must not live on as orphans
    that keep training and writing checkpoints into output_dir beside a resubmitted job."""
    import signal
    import subprocess
    import time

    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=100000, grad_accum=1, save_every=0)
    path = write_recipe(tmp_path / f"orphan_{launcher}.yaml", recipe)
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", port]
    cmd += [os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        metrics = os.path.join(recipe["output_dir"], "metrics.jsonl")
        deadline = time.monotonic() + 180
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and time.monotonic() < deadline:
            assert p.poll() is None, "the run ended before it logged a step"
            time.sleep(0.2)
        ranks = [pid for pid in _pids_running(path) if _is_rank(pid)]
        assert len(ranks) == 2, f"expected 2 rank processes, found {ranks}"
        # the deepspeed runner execs a `deepspeed.launcher.launch` child: kill every launcher, no rank
        launchers = [pid for pid in _pids_running(path) if pid not in ranks]
        for pid in launchers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(pid in _pids_running(path) for pid in ranks):
            time.sleep(0.2)
        left = [pid for pid in ranks if pid in _pids_running(path)]
        assert not left, f"ranks {left} outlived their launcher"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        for pid in _pids_running(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait(timeout=30)
