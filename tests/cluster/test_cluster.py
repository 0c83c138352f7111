"""Clusters, for real: Slurm batch jobs (and requeue after SIGUSR1), OpenMPI, two "nodes" on one machine
through torchrun and the deepspeed launcher, preflight mismatches and broken launch environments.

Every launcher must give the 1-rank reference's losses for the same global batch: 1 rank x micro-batch 2
x accumulation 4 = 2 ranks x 2 x 2. Every process runs under a hard timeout; Slurm tests start the
single-node test cluster of tests/cluster/slurm_up.sh (installing it as root) and skip only where it
cannot be started (LLMTRAIN_REQUIRE_SLURM=1 turns that into a failure).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, base_recipe, free_port, have, python_cmd, run_cmd, write_recipe
from tests.cluster.slurm import ensure_slurm, read_log, sbatch_submit, slurm_env, wait_job

pytestmark = pytest.mark.multiproc
MAX_STEPS = 30  # long enough to signal a Slurm job mid-run (tiny model: ~0.1-0.2 s per step)
TIMEOUT_S = 240  # hard limit per launch (a healthy one takes 10-30 s)
TRAIN_SBATCH = Path(REPO) / "launch" / "slurm" / "train.sbatch"
CPU_SBATCH = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00"]
SFT, PREFLIGHT = os.path.join(REPO, "launch", "sft.py"), os.path.join(REPO, "launch", "preflight.py")


def step_rows(output_dir) -> dict[int, dict]:
    """step -> its training row; a resumed run may log a step twice: the last row wins (it is what the run kept)."""
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl")) if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def losses_by_step(output_dir) -> dict[int, float]:
    return {step: r["loss"] for step, r in step_rows(output_dir).items()}


def usr1_once_training(job: str, log_path: Path, metrics: Path) -> int:
    """Once the job's first step is logged, SIGUSR1 to its ranks (scancel --signal); its exit status."""
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (metrics.exists() and '"loss"' in metrics.read_text()):  # the first step is done
            assert time.monotonic() < deadline, f"no step after {TIMEOUT_S} s:\n{read_log(log_path)[-5000:]}"
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30, env=slurm_env())
        return wait_job(job, TIMEOUT_S, log_path)
    finally:
        subprocess.run(["scancel", job], timeout=30, env=slurm_env())


def resumed_at(log: str) -> int:
    return int(log.split("resumed from ")[1].split(" at step ")[1].split()[0])


def assert_same_losses(output_dir, reference):
    got, ref = losses_by_step(output_dir), losses_by_step(reference)
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-4, abs=1e-5)


def two_rank_recipe(tmp_path, tiny_model_dir, **train) -> tuple[str, str]:
    recipe = base_recipe(tmp_path, tiny_model_dir, max_steps=MAX_STEPS, grad_accum=2, **train)
    recipe["dist"] = {"timeout_minutes": 1.0}  # a launch that goes wrong fails in a minute, not 30
    return write_recipe(tmp_path / "r.yaml", recipe), recipe["output_dir"]


def run_together(cmds: list[list[str]], timeout: float = TIMEOUT_S, envs=None) -> list[tuple[int, str]]:
    """Start every command at once (one per "node"), wait for all under one hard timeout; (rc, output) each."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": BIN + os.pathsep + os.environ["PATH"]}
    logs = [tempfile.TemporaryFile("w+") for _ in cmds]
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                              env={**base, **((envs or [{}] * len(cmds))[i])}) for i, (c, f) in enumerate(zip(cmds, logs))]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher's whole session: agents and ranks
                p.wait()
    out = []
    for p, f in zip(procs, logs):
        f.seek(0)
        out.append((p.returncode, f.read()))
        f.close()
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """1 rank, micro-batch 2 x accumulation 4 = global batch 8, MAX_STEPS steps: the losses to match."""
    tmp = tmp_path_factory.mktemp("cluster-ref")
    recipe = base_recipe(tmp, tiny_model_dir, max_steps=MAX_STEPS, grad_accum=4)
    proc = run_cmd(python_cmd("launch/sft.py", "--recipe", write_recipe(tmp / "r.yaml", recipe)), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return recipe["output_dir"]


@pytest.fixture
def slurm():
    reason = ensure_slurm()
    if reason is not None:
        pytest.skip(reason)


# --- Slurm ----------------------------------------------------------------------------------------

def test_slurm_batch_job_matches_one_rank(slurm, reference, tiny_model_dir, tmp_path):
    recipe, out_dir = two_rank_recipe(tmp_path, tiny_model_dir)
    job, log_path = sbatch_submit(TRAIN_SBATCH, [SFT, "--recipe", recipe], sbatch_args=CPU_SBATCH, workdir=tmp_path)
    rc = wait_job(job, TIMEOUT_S, log_path)
    log = read_log(log_path)
    assert rc == 0, log[-5000:]
    assert "2 rank(s) via slurm" in log and "preflight: all ranks agree" in log, log[-5000:]
    assert "done: " in log
    assert_same_losses(out_dir, reference)


def test_slurm_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(slurm, reference, tiny_model_dir, tmp_path):
    recipe, out_dir = two_rank_recipe(tmp_path, tiny_model_dir, requeue_on_signal=True, resume="auto")
    job, log_path = sbatch_submit(TRAIN_SBATCH, [SFT, "--recipe", recipe], sbatch_args=[*CPU_SBATCH, "--requeue"],
                                  workdir=tmp_path)
    rc = usr1_once_training(job, log_path, Path(out_dir) / "metrics.jsonl")
    log = read_log(log_path)
    assert rc == 0, log[-6000:]
    assert "stopped: " in log and f"requeued Slurm job {job}" in log, log[-6000:]
    assert "(restart 1)" in log and "resumed from " in log and "done: " in log, log[-6000:]
    assert 0 < resumed_at(log) < MAX_STEPS, log[-6000:]  # it did stop mid-run
    assert_same_losses(out_dir, reference)


RL = os.path.join(REPO, "launch", "rl.py")
RL_REWARDS = """
def digits(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / 3.0 for c in completions]

def length(prompts, completions, **_):
    return [float(len(c) % 4) for c in completions]
"""


def rl_recipe(tmp_path, tiny_model_dir, out: str, grad_accum: int, **train) -> str:
    """GRPO on the tiny model: 4 prompts x 2 samples per rollout, 2 epochs x 2 mini-batches = 4 steps per
    rollout, 12 steps, ZeRO-3, a checkpoint every 5 steps (inside rollouts)."""
    (tmp_path / "rl_rewards.py").write_text(RL_REWARDS)
    recipe = {
        "output_dir": str(tmp_path / out),
        "model": {"name_or_path": tiny_model_dir},
        "data": {"train": [os.path.join(REPO, "data/demo/rl_train.jsonl")]},
        "train": {"max_steps": 12, "seed": 5, "micro_batch_size": 1, "grad_accum": grad_accum, "lr": 2e-3,
                  "warmup_steps": 0, "schedule": "constant", "log_every": 1, "save_every": 5, **train},
        "rl": {"num_generations": 2, "prompts_per_step": 4, "max_new_tokens": 6, "ppo_epochs": 2, "mini_batches": 2,
               "kl_coef": 0.1, "reward_fns": ["rl_rewards:digits", "rl_rewards:length"], "reward_weights": [1.0, 0.5]},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero3.json")},
        "dist": {"timeout_minutes": 1.0},
        "logging": {"progress": False},
    }
    return write_recipe(tmp_path / f"{out}.yaml", recipe)


def test_slurm_rl_job_preempted_mid_run_requeues_and_resumes_to_the_one_rank_losses(slurm, tiny_model_dir, tmp_path):
    """An online-RL (GRPO) job under Slurm on 2 ranks, ZeRO-3: SIGUSR1 while it trains, a checkpoint, the
    requeue resumes it (inside a rollout where the stop fell there: the rollout's samples come from the
    checkpoint); every step's losses and rewards == the 1-rank run with accumulation."""
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    ref = run_cmd(python_cmd("launch/rl.py", "--recipe", rl_recipe(tmp_path, tiny_model_dir, "one", grad_accum=4)),
                  timeout=TIMEOUT_S, env=env)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    recipe = rl_recipe(tmp_path, tiny_model_dir, "two", grad_accum=2, requeue_on_signal=True, resume="auto")
    job, log_path = sbatch_submit(TRAIN_SBATCH, [RL, "--recipe", recipe], env=env,
                                  sbatch_args=[*CPU_SBATCH, "--requeue"], workdir=tmp_path)
    rc = usr1_once_training(job, log_path, tmp_path / "two" / "metrics.jsonl")
    log = read_log(log_path)
    assert rc == 0, log[-6000:]
    assert "2 rank(s) via slurm" in log and f"requeued Slurm job {job}" in log and "(restart 1)" in log, log[-6000:]
    assert 0 < resumed_at(log) < 12 and "regenerated" not in log, log[-6000:]
    one, two = step_rows(tmp_path / "one"), step_rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    for step in one:
        for key in ("loss", "policy_loss", "kl", "clip_frac", "ratio", "reward", "reward_std"):
            if key in one[step]:
                assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert one[1]["reward_std"] > 0 and len({one[s]["reward"] for s in (1, 5, 9)}) == 3  # a real signal


def test_slurm_reward_model_job_matches_one_rank(slurm, tiny_model_dir, tmp_path):
    """Reward-model training (launch/reward.py) as a 2-rank Slurm batch job == 1 rank with accumulation:
    train and held-out (5 pairs: uneven over 2 ranks) figures."""
    with open(os.path.join(REPO, "data/demo/dpo_eval.jsonl")) as f:
        (tmp_path / "eval5.jsonl").write_text("".join(f.readlines()[:5]))

    def recipe(out: str, grad_accum: int) -> str:
        r = {"output_dir": str(tmp_path / out), "model": {"name_or_path": tiny_model_dir},
             "data": {"train": [os.path.join(REPO, "data/demo/dpo_train.jsonl")], "eval": [str(tmp_path / "eval5.jsonl")],
                      "max_seq_len": 96, "max_prompt_len": 64, "packing": True},
             "train": {"max_steps": 6, "seed": 2, "micro_batch_size": 2, "grad_accum": grad_accum, "lr": 2e-3,
                       "warmup_steps": 1, "log_every": 1, "eval_every": 3}, "reward": {"center_coef": 0.01},
             "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero2.json")},
             "dist": {"timeout_minutes": 1.0}, "logging": {"progress": False}}
        return write_recipe(tmp_path / f"{out}.yaml", r)

    ref = run_cmd(python_cmd("launch/reward.py", "--recipe", recipe("one", 4)), timeout=TIMEOUT_S)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    job, log_path = sbatch_submit(TRAIN_SBATCH, [os.path.join(REPO, "launch", "reward.py"), "--recipe", recipe("two", 2)],
                                  sbatch_args=CPU_SBATCH, workdir=tmp_path)
    rc = wait_job(job, TIMEOUT_S, log_path)
    log = read_log(log_path)
    assert rc == 0 and "2 rank(s) via slurm" in log and "done: " in log, log[-5000:]
    one, two = (step_rows(tmp_path / k) for k in ("one", "two"))
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward"):  # rewards ~1e-2: abs 1e-5
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    evals = [[json.loads(ln) for ln in open(tmp_path / k / "metrics.jsonl") if "eval_loss" in ln] for k in ("one", "two")]
    assert len(evals[0]) == 2 and [e["eval_loss"] for e in evals[1]] == pytest.approx([e["eval_loss"] for e in evals[0]],
                                                                                       rel=1e-4)


# --- MPI ------------------------------------------------------------------------------------------

def test_mpirun_preflight_reports_both_ranks(tiny_model_dir, tmp_path):
    if not have("mpirun"):
        pytest.skip("OpenMPI (mpirun) is not installed; scripts/setup.sh installs it as root")
    recipe, _ = two_rank_recipe(tmp_path, tiny_model_dir)
    proc = run_cmd(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1",
                    "-x", "PATH", "-x", f"MASTER_PORT={free_port()}", *python_cmd("launch/preflight.py", "--recipe", recipe)],
                   timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "preflight: 2 rank(s) via mpi" in out and "preflight: all ranks agree" in out, out[-4000:]
    table = out.split("all-reduce GB/s\n", 1)[1].splitlines()[:2]
    assert [line.split()[0] for line in table] == ["0", "1"], out[-4000:]
    assert all(float(line.split()[-1]) > 0 for line in table), out[-4000:]  # the probe measured both ranks


# --- two nodes on one machine ---------------------------------------------------------------------

def test_two_torchrun_nodes_match_one_rank(reference, tiny_model_dir, tmp_path):
    recipe, out_dir = two_rank_recipe(tmp_path, tiny_model_dir)
    endpoint = f"127.0.0.1:{free_port()}"
    cmds = [[os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "cluster-test",
             SFT, "--recipe", recipe] for k in (0, 1)]
    results = run_together(cmds)
    assert all(rc == 0 for rc, _ in results), "\n---\n".join(o[-3000:] for _, o in results)
    assert any("2 rank(s) via deepspeed/torchrun" in o for _, o in results)
    assert_same_losses(out_dir, reference)


def test_two_deepspeed_nodes_match_one_rank(reference, tiny_model_dir, tmp_path):
    recipe, out_dir = two_rank_recipe(tmp_path, tiny_model_dir)
    hostfile = tmp_path / "hostfile"  # two "nodes", one slot each; --no_ssh: each launcher starts only its own
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    cmds = [[os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "1",
             "--node_rank", str(k), "--master_addr", "127.0.0.1", "--master_port", port, "--no_ssh",
             SFT, "--recipe", recipe] for k in (0, 1)]
    results = run_together(cmds)
    assert all(rc == 0 for rc, _ in results), "\n---\n".join(o[-3000:] for _, o in results)
    assert any("2 rank(s) via deepspeed/torchrun" in o for _, o in results)
    assert_same_losses(out_dir, reference)


# --- preflight and broken launches ----------------------------------------------------------------

def test_preflight_names_the_rank_with_a_different_config(tiny_model_dir, tmp_path):
    recipe, out_dir = two_rank_recipe(tmp_path, tiny_model_dir)
    port = str(free_port())
    cmds = [[os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k),
             "--master_addr", "127.0.0.1", "--master_port", port, SFT, "--recipe", recipe, f"train.lr={lr}"]
            for k, lr in ((0, "1e-3"), (1, "2e-3"))]
    results = run_together(cmds, timeout=120)
    for rc, out in results:
        assert rc != 0, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error: preflight:")]
        assert errors, out[-3000:]  # every rank says it, in one line
        assert "rank 1 (host " in errors[0] and "different config hash than rank 0" in errors[0], errors
        assert "train.lr=0.002 vs 0.001" in errors[0], errors
    assert not os.path.exists(os.path.join(out_dir, "metrics.jsonl"))  # nothing trained


def test_missing_slurm_rank_fails_in_one_line_naming_it(tiny_model_dir, tmp_path):
    """SLURM_NTASKS=2 but only task 0 exists (e.g. a hand-edited environment): rank 0 names rank 1."""
    recipe, _ = two_rank_recipe(tmp_path, tiny_model_dir)
    port = free_port()
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}, **env}
    start = time.monotonic()
    proc = subprocess.run(python_cmd("launch/sft.py", "--recipe", recipe, "dist.timeout_minutes=0.1"), env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "rank 0 (host " in line and "only 1 of 2 ranks (SLURM_NTASKS=2)" in line, line
    assert f"127.0.0.1:{port} within 0.1 min" in line and "missing rank(s) 1;" in line, line
    assert elapsed < 60, elapsed


def test_master_port_in_use_is_named_at_once(tiny_model_dir, tmp_path):
    recipe, _ = two_rank_recipe(tmp_path, tiny_model_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = run_cmd(python_cmd("launch/preflight.py", "--recipe", recipe), env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"MASTER_PORT={port} is already in use" in line, line


def test_hostfile_with_an_unknown_host_is_named(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\nno-such-node.invalid slots=8\n")
    proc = run_cmd(python_cmd("launch/preflight.py", "--hostfile", str(hostfile)), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: hostfile no-such-node.invalid: does not resolve" in proc.stderr, proc.stderr
