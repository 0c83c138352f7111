"""Crash consistency: SIGKILL a training run at random moments (checkpoint writes included),
resume with train.resume=auto each time, and check the end result equals an uninterrupted run.

  python bench/crash_harness.py [--kills 20] [--ranks 1|2] [--seed 0] [--workdir DIR]

Prints one line per restart and a summary: restarts, failed restarts, incomplete checkpoints
loaded (must be 0), whether losses (bitwise) and final weights equal the uninterrupted run's.
Exit status 0 only if everything held.
"""
import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def recipe(model_dir: str, out: str) -> dict:
    return {
        "output_dir": out,
        "model": {"name_or_path": model_dir},
        "data": {"train": [os.path.join(REPO, "data/demo/sft_train.jsonl")], "max_seq_len": 64, "packing": True},
        "train": {"max_steps": 24, "seed": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 2,
                  "save_every": 1, "keep_last": 2, "log_every": 1},
        "deepspeed": {"config": os.path.join(REPO, "ds_configs/zero2.json")},
        "logging": {"progress": False},
    }


def command(path: str, ranks: int, port: int) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    if ranks == 1:
        return [sys.executable, os.path.join(REPO, "launch/sft.py"), "--recipe", path]
    return [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(port),
            os.path.join(REPO, "launch/sft.py"), "--recipe", path]


def losses(out: str) -> list:
    import json

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f if '"loss"' in l]


def weights(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="llmtrain-crash-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from conftest import build_tiny

    model_dir = os.path.join(work, "model")
    if not os.path.isdir(model_dir):
        m, t = build_tiny("llama")
        m.save_pretrained(model_dir)
        t.save_pretrained(model_dir)

    def write(name):
        out = os.path.join(work, name)
        shutil.rmtree(out, ignore_errors=True)
        path = os.path.join(work, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe(model_dir, out), f)
        return out, path

    ref_out, ref_path = write("reference")
    t0 = time.time()
    subprocess.run(command(ref_path, args.ranks, 29801), env=env, check=True, capture_output=True)
    full_run_s = time.time() - t0
    print(f"uninterrupted run: {full_run_s:.1f}s, {len(losses(ref_out))} steps")

    out, path = write("crashed")
    restarts = failures = incomplete_loads = 0
    kills = 0
    while True:
        p = subprocess.Popen(command(path, args.ranks, 29802 + restarts % 50), env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        restarts += 1
        if kills < args.kills:
            delay = rng.uniform(0.5, full_run_s)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                kills += 1
        log, _ = p.communicate()
        resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
        if resumed and not os.path.isfile(os.path.join(resumed.group(1), "COMPLETE")):
            incomplete_loads += 1
        if p.returncode not in (0, -signal.SIGKILL):
            failures += 1
            print(f"restart {restarts}: FAILED rc={p.returncode}\n{log[-2000:]}")
        step = resumed.group(2) if resumed else "0"
        state = "finished" if p.returncode == 0 else f"killed after {delay:.1f}s"
        print(f"restart {restarts:>2}: resumed at step {step:>2}, {state}")
        if p.returncode == 0:
            break
        if restarts > args.kills + 5:
            break
    same_losses = losses(out) == losses(ref_out)
    a, b = weights(ref_out), weights(out)
    same_weights = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    print(f"\nkills={kills} restarts={restarts} failed_restarts={failures} incomplete_checkpoints_loaded={incomplete_loads} "
          f"losses_bitwise_equal={same_losses} final_weights_bitwise_equal={same_weights} (ranks={args.ranks}, workdir={work})")
    ok = failures == 0 and incomplete_loads == 0 and same_losses and same_weights and kills >= args.kills
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
